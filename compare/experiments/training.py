"""The training runs of the ``train`` suite, the same way in PyTorch and Flax (linen);
``compare.experiments.claims`` turns their records into verdicts.

Every run starts both frameworks from the *same* weights (the torch initialisation,
transferred) and feeds them the same batches in the same order (``compare.experiments.data.batches``).
Only the dropout masks differ (each framework draws its own; ``compare.masks`` exists for
exact comparisons, but here each framework trains as its users would run it). Flax uses
its stock BatchNorm statistics with torch's momentum (0.9 in Flax's direction).
"""

from __future__ import annotations

import dataclasses
import functools
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
from compare.conventions import to_flax_input
from compare.experiments import data as datalib
from compare.records import TrainRecord

DIVERGED_LOSS = 1e3  # a training loss above this (or not finite) ends the run as diverged


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


def _torch_run(spec, ds, cfg: RunConfig, init: dict, target: float, device: str = "cpu") -> dict:
    """``device``: "cpu" or "gpu" (the data moves to the GPU once, as JAX's does)."""
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    torch.manual_seed(cfg.seed)  # dropout masks (CPU generator; torch.manual_seed seeds CUDA too)
    model = spec.build_torch().to(dev)
    model.load_state_dict(init)
    opt = ttrain.sgd(model, lr=cfg.lr, momentum=0.9)
    x_train = torch.from_numpy(_inputs(spec, ds.x_train)).to(dev)
    x_test = torch.from_numpy(_inputs(spec, ds.x_test)).to(dev)
    y_train, y_test = torch.from_numpy(ds.y_train).to(dev), torch.from_numpy(ds.y_test).to(dev)

    def evaluate(x, y):
        model.eval()
        with torch.no_grad():
            logits = model(x)
            loss = float(ttrain.cross_entropy(logits, y))
            return loss, float((logits.argmax(1) == y).float().mean())

    def train_epoch(epoch):
        losses = []
        for idx in datalib.batches(len(ds.x_train), cfg.batch_size, cfg.seed, epoch):
            idx = torch.from_numpy(idx).to(dev)
            losses.append(ttrain.train_step(model, opt, x_train[idx], y_train[idx]))
        return [float(v) for v in losses]  # one synchronisation per epoch

    return _loop(cfg, ds, train_epoch, lambda: evaluate(x_train, y_train), lambda: evaluate(x_test, y_test), target)


@functools.lru_cache(maxsize=64)
def _linen_fns(spec: registry.ModelSpec):
    """Jitted train and eval functions per architecture; the learning rate lives in the
    optimizer state (``inject_hyperparams``), so a sweep over it compiles once."""
    model = spec.build_linen()
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)  # ftrain.sgd, lr injectable
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
    run = _LinenRun(step, evaluate, state, jax.random.key(cfg.seed))
    x_train = jnp.asarray(to_flax_input(_inputs(spec, ds.x_train)))
    x_test = jnp.asarray(to_flax_input(_inputs(spec, ds.x_test)))
    y_train, y_test = jnp.asarray(ds.y_train), jnp.asarray(ds.y_test)

    def train_epoch(epoch):
        idxs = datalib.batches(len(ds.x_train), cfg.batch_size, cfg.seed, epoch)
        return [run.step(x_train[idx], y_train[idx]) for idx in idxs]

    return _loop(
        cfg, ds, train_epoch, lambda: run.evaluate(x_train, y_train), lambda: run.evaluate(x_test, y_test), target
    )


class _LinenRun:
    """A linen run's state between steps: the functional step returns the new state,
    which this object keeps (the run is sequential; the step itself stays pure)."""

    def __init__(self, step, evaluate, state: ftrain.LinenState, key: jax.Array):
        self._step, self._evaluate, self.state, self.key = step, evaluate, state, key

    def step(self, x: jax.Array, y: jax.Array) -> float:
        self.state, loss = self._step(self.state, x, y, self.key)
        return float(loss)

    def evaluate(self, x: jax.Array, y: jax.Array) -> tuple[float, float]:
        loss, acc = self._evaluate(self.state.params, self.state.batch_stats, x, y)
        return float(loss), float(acc)


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


def run_one(
    cfg: RunConfig, ds: datalib.Dataset, frameworks=("torch", "linen"), target: float = 0.9, device: str = "cpu"
) -> list[dict]:
    """The run in every framework, from the same torch initialisation; one record each.
    ``device`` ("cpu" or "gpu") is where torch trains; JAX trains on its default device."""
    spec = model_spec(cfg.model, ds, cfg.use_bn, cfg.dropout)
    torch.manual_seed(1000 + cfg.seed)  # the shared initial weights
    init = {k: v.clone() for k, v in spec.build_torch().state_dict().items()}
    records = []
    for fw in frameworks:
        if fw == "torch":
            result = _torch_run(spec, ds, cfg, init, target, device)
        else:
            result = _linen_run(spec, ds, cfg, init, target)
        records.append(
            TrainRecord(
                claim=cfg.claim,
                model=cfg.model,
                framework=fw,
                dataset=ds.name,
                use_bn=cfg.use_bn,
                dropout=cfg.dropout,
                lr=cfg.lr,
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                target_accuracy=target,
                **result,
            ).to_dict()
        )
    return records


def run(grid: Grid, ds: datalib.Dataset, progress: Callable | None = None, device: str = "cpu") -> list[dict]:
    """Every run of the grid in torch (on ``device``) and linen."""
    records = []
    for cfg in grid.runs():
        records += run_one(cfg, ds, target=grid.target_accuracy, device=device)
        if progress:
            progress(f"{cfg.claim}: {cfg.model} bn={cfg.use_bn} p={cfg.dropout} lr={cfg.lr}")
    return records
