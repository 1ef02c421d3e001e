"""The training comparison: the classic BatchNorm and Dropout claims, measured the same
way in PyTorch and Flax (linen).

Every run starts both frameworks from the *same* weights (the torch initialisation,
transferred) and feeds them the same batches in the same order (``compare.experiments.data.batches``).
Only the dropout masks differ (each framework draws its own; ``compare.masks`` exists for
exact comparisons, but here each framework trains as its users would run it). Flax uses
its stock BatchNorm statistics with torch's momentum (0.9 in Flax's direction).

* BatchNorm claim: mlp and cnn, with and without BatchNorm, over a learning-rate sweep
  (SGD, momentum 0.9, no dropout). It holds for a model when BatchNorm trains stably at
  every learning rate where the plain network does, and at a higher one or faster
  (fewer steps to the target test accuracy).
* Dropout claim: mlp and cnn *without* BatchNorm (the setting of the Dropout paper, and
  BatchNorm regularises too, which would hide the effect) with p = 0, 0.2, 0.5, trained
  long enough to overfit, over two seeds. It holds when the generalisation gap (test loss
  - train loss, both in eval mode, averaged over the last 5 epochs and the seeds) shrinks
  as p grows.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import flaxbn.train as ftrain
import torchbn.train as ttrain
from compare import registry, transfer
from compare.conventions import nchw_to_nhwc
from compare.experiments import data as datalib

DIVERGED_LOSS = 1e3  # a training loss above this (or not finite) ends the run as diverged
STABLE_ACCURACY = 0.5  # a run that did not diverge and ends above this trained "stably"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    claim: str  # "batchnorm" | "dropout"
    model: str  # "mlp" | "cnn"
    use_bn: bool
    dropout: float
    lr: float
    epochs: int
    batch_size: int = 64
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Grid:
    lrs: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0)
    bn_epochs: int = 12
    dropouts: tuple[float, ...] = (0.0, 0.2, 0.5)
    dropout_lr: float = 0.1
    dropout_epochs: int = 60
    dropout_seeds: tuple[int, ...] = (0, 1)
    models: tuple[str, ...] = ("mlp", "cnn")
    target_accuracy: float = 0.9

    def runs(self) -> list[RunConfig]:
        out = [
            RunConfig("batchnorm", m, bn, 0.0, lr, self.bn_epochs)
            for m in self.models
            for bn in (True, False)
            for lr in self.lrs
        ]
        out += [
            RunConfig("dropout", m, False, p, self.dropout_lr, self.dropout_epochs, seed=seed)
            for m in self.models
            for p in self.dropouts
            for seed in self.dropout_seeds
        ]
        return out


GRIDS = {
    "quick": Grid(),
    "full": Grid(
        lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        bn_epochs=30,
        dropouts=(0.0, 0.1, 0.2, 0.3, 0.5),
        dropout_epochs=100,
        dropout_seeds=(0, 1, 2, 3),
    ),
}


def model_spec(model: str, dataset: datalib.Dataset, use_bn: bool, dropout: float) -> registry.ModelSpec:
    """The registry's mlp or cnn, sized for the dataset's images."""
    c, h, w = dataset.image_shape
    if model == "mlp":
        return registry.get("mlp").replace(
            in_features=c * h * w, hidden=(256, 256), num_classes=dataset.num_classes, dropout=dropout, use_bn=use_bn
        )
    channels = (16, 32) if h <= 8 else (32, 64)
    return registry.get("cnn").replace(
        in_channels=c,
        image_size=h,
        channels=channels,
        hidden=128,
        num_classes=dataset.num_classes,
        dropout=dropout,
        dropout2d=0.0,
        use_bn=use_bn,
    )


def _inputs(spec: registry.ModelSpec, x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1) if len(spec.input_shape) == 1 else x  # mlp: (N, C, H, W) -> (N, C*H*W)


# --- one run per framework ---------------------------------------------------------------


def _torch_run(spec, ds, cfg: RunConfig, init: dict, target: float) -> dict:
    torch.manual_seed(cfg.seed)  # dropout masks
    model = spec.build_torch()
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    x_train, x_test = _inputs(spec, ds.x_train), _inputs(spec, ds.x_test)

    def evaluate(x, y):
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
            loss = float(ttrain.cross_entropy(logits, torch.from_numpy(y)))
            return loss, float((logits.argmax(1).numpy() == y).mean())

    def train_epoch(epoch):
        losses = []
        for idx in datalib.batches(len(x_train), cfg.batch_size, cfg.seed, epoch):
            loss = ttrain.train_step(model, opt, torch.from_numpy(x_train[idx]), torch.from_numpy(ds.y_train[idx]))
            losses.append(float(loss))
        return losses

    return _loop(
        cfg, ds, train_epoch, lambda: evaluate(x_train, ds.y_train), lambda: evaluate(x_test, ds.y_test), target
    )


@functools.lru_cache(maxsize=64)
def _linen_fns(spec: registry.ModelSpec):
    """Jitted train and eval functions per architecture; the learning rate lives in the
    optimizer state (``inject_hyperparams``), so a sweep over it compiles once."""
    model = spec.build_linen()
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    step = jax.jit(functools.partial(ftrain.linen_train_step, model.apply, tx), donate_argnums=0)

    @jax.jit
    def evaluate(params, batch_stats, x, y):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return ftrain.cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, -1) == y)

    return tx, step, evaluate


def _linen_run(spec, ds, cfg: RunConfig, init: dict, target: float) -> dict:
    tx, step, evaluate = _linen_fns(spec)
    variables = transfer.torch_to_linen(init, spec)
    state = ftrain.linen_init_state(variables, tx)
    state.opt_state.hyperparams["learning_rate"] = jnp.asarray(cfg.lr, jnp.float32)
    key = jax.random.key(cfg.seed)

    def flax_x(x):
        return jnp.asarray(nchw_to_nhwc(x) if x.ndim == 4 else x)

    x_train, x_test = _inputs(spec, ds.x_train), _inputs(spec, ds.x_test)
    xs_train, xs_test = flax_x(x_train), flax_x(x_test)
    ys_train, ys_test = jnp.asarray(ds.y_train), jnp.asarray(ds.y_test)
    holder = {"state": state}

    def train_epoch(epoch):
        losses = []
        for idx in datalib.batches(len(x_train), cfg.batch_size, cfg.seed, epoch):
            holder["state"], loss = step(holder["state"], flax_x(x_train[idx]), jnp.asarray(ds.y_train[idx]), key)
            losses.append(loss)
        return [float(v) for v in losses]

    def ev(x, y):
        loss, acc = evaluate(holder["state"].params, holder["state"].batch_stats, x, y)
        return float(loss), float(acc)

    return _loop(cfg, ds, train_epoch, lambda: ev(xs_train, ys_train), lambda: ev(xs_test, ys_test), target)


def _loop(cfg: RunConfig, ds, train_epoch: Callable, eval_train: Callable, eval_test: Callable, target: float) -> dict:
    """Epochs of training with eval-mode metrics after each; stops early on divergence."""
    curves = {k: [] for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
    steps_per_epoch = len(ds.x_train) // cfg.batch_size
    diverged, steps_to_target = False, None
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        losses = train_epoch(epoch)
        if not all(math.isfinite(v) and v < DIVERGED_LOSS for v in losses):
            diverged = True
            break
        for name, (loss, acc) in (("train", eval_train()), ("test", eval_test())):
            curves[f"{name}_loss"].append(loss)
            curves[f"{name}_acc"].append(acc)
        if not math.isfinite(curves["train_loss"][-1]):
            diverged = True
            break
        if steps_to_target is None and curves["test_acc"][-1] >= target:
            steps_to_target = (epoch + 1) * steps_per_epoch
    nan = float("nan")
    final = {k: (v[-1] if v and not diverged else nan) for k, v in curves.items()}
    return {
        **{f"final_{k}": final[k] for k in curves},
        "diverged": diverged,
        "steps_to_target": steps_to_target,
        "wall_s": time.perf_counter() - t0,
        "curves": curves,
    }


def run_one(cfg: RunConfig, ds: datalib.Dataset, frameworks=("torch", "linen"), target: float = 0.9) -> list[dict]:
    """The run in every framework, from the same torch initialisation; one record each."""
    spec = model_spec(cfg.model, ds, cfg.use_bn, cfg.dropout)
    torch.manual_seed(1000 + cfg.seed)  # the shared initial weights
    init = {k: v.clone() for k, v in spec.build_torch().state_dict().items()}
    records = []
    for fw in frameworks:
        result = (_torch_run if fw == "torch" else _linen_run)(spec, ds, cfg, init, target)
        records.append(
            {
                "claim": cfg.claim,
                "model": cfg.model,
                "framework": fw,
                "dataset": ds.name,
                "use_bn": cfg.use_bn,
                "dropout": cfg.dropout,
                "lr": cfg.lr,
                "epochs": cfg.epochs,
                "batch_size": cfg.batch_size,
                "seed": cfg.seed,
                "target_accuracy": target,
                **result,
            }
        )
    return records


def run(grid: Grid, ds: datalib.Dataset, progress: Callable | None = None) -> list[dict]:
    records = []
    for cfg in grid.runs():
        records += run_one(cfg, ds, target=grid.target_accuracy)
        if progress:
            progress(f"{cfg.claim}: {cfg.model} bn={cfg.use_bn} p={cfg.dropout} lr={cfg.lr}")
    return records


# --- the claims --------------------------------------------------------------------------


def _stable(r: dict) -> bool:
    return not r["diverged"] and r["final_test_acc"] >= STABLE_ACCURACY


def batchnorm_claim(records: list[dict], model: str, framework: str) -> dict:
    rs = [r for r in records if r["claim"] == "batchnorm" and r["model"] == model and r["framework"] == framework]
    by = {(r["use_bn"], r["lr"]): r for r in rs}
    lrs = sorted({r["lr"] for r in rs})
    stable_bn = [lr for lr in lrs if _stable(by[(True, lr)])]
    stable_plain = [lr for lr in lrs if _stable(by[(False, lr)])]
    both = [lr for lr in lrs if lr in stable_bn and lr in stable_plain]
    never = 10**9

    def mean_steps(bn):
        return float(np.mean([by[(bn, lr)]["steps_to_target"] or never for lr in both])) if both else None

    higher = bool(set(stable_bn) > set(stable_plain))
    faster = bool(both) and mean_steps(True) < mean_steps(False)
    holds = set(stable_plain) <= set(stable_bn) and (higher or faster)
    detail = (
        f"stable learning rates with BN {stable_bn}, without {stable_plain}; "
        f"diverged without BN at {[lr for lr in lrs if by[(False, lr)]['diverged']]}, with BN at "
        f"{[lr for lr in lrs if by[(True, lr)]['diverged']]}; final test accuracy with/without BN per lr: "
        + ", ".join(
            f"{lr}: {by[(True, lr)]['final_test_acc']:.3f}/{by[(False, lr)]['final_test_acc']:.3f}" for lr in lrs
        )
    )
    return {"claim": "batchnorm", "model": model, "framework": framework, "holds": holds, "detail": detail}


GAP_EPOCHS = 5


def generalisation_gap(r: dict) -> float:
    """test loss - train loss (eval mode), averaged over the last ``GAP_EPOCHS`` epochs."""
    c = r["curves"]
    if r["diverged"] or not c["test_loss"]:
        return float("nan")
    return float(np.mean(np.subtract(c["test_loss"], c["train_loss"])[-GAP_EPOCHS:]))


def dropout_claim(records: list[dict], model: str, framework: str) -> dict:
    rs = [r for r in records if r["claim"] == "dropout" and r["model"] == model and r["framework"] == framework]
    ps = sorted({r["dropout"] for r in rs})
    gaps = [(p, float(np.mean([generalisation_gap(r) for r in rs if r["dropout"] == p]))) for p in ps]
    values = [g for _, g in gaps]
    monotone = all(a > b for a, b in itertools.pairwise(values))
    holds = bool(values) and values[-1] < values[0] and monotone
    detail = f"generalisation gap (test - train loss, last {GAP_EPOCHS} epochs, mean of seeds) by p: " + ", ".join(
        f"{p}: {g:.3f}" for p, g in gaps
    )
    if values and values[-1] < values[0] and not monotone:
        detail += " (smaller at the largest p, but not monotone)"
    return {"claim": "dropout", "model": model, "framework": framework, "holds": holds, "detail": detail}


def claims(records: list[dict]) -> list[dict]:
    out = []
    for fw in sorted({r["framework"] for r in records}):
        for model in sorted({r["model"] for r in records}):
            if any(r["claim"] == "batchnorm" and r["model"] == model for r in records):
                out.append(batchnorm_claim(records, model, fw))
            if any(r["claim"] == "dropout" and r["model"] == model for r in records):
                out.append(dropout_claim(records, model, fw))
    return out


def framework_agreement(records: list[dict]) -> list[dict]:
    """Per run: the final test accuracy of each framework and their difference."""
    runs: dict[tuple, dict] = {}
    for r in records:
        key = (r["claim"], r["model"], r["use_bn"], r["dropout"], r["lr"], r["seed"])
        runs.setdefault(key, {})[r["framework"]] = r
    rows = []
    for (claim, model, use_bn, dropout, lr, seed), by_fw in runs.items():
        if {"torch", "linen"} <= set(by_fw):
            a, b = by_fw["torch"]["final_test_acc"], by_fw["linen"]["final_test_acc"]
            rows.append(
                {
                    "claim": claim,
                    "model": model,
                    "use_bn": use_bn,
                    "dropout": dropout,
                    "lr": lr,
                    "seed": seed,
                    "torch_test_acc": a,
                    "linen_test_acc": b,
                    "acc_diff": abs(a - b) if math.isfinite(a) and math.isfinite(b) else None,
                    "both_diverged": by_fw["torch"]["diverged"] and by_fw["linen"]["diverged"],
                }
            )
    return rows
