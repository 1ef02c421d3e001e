"""The training runs of the ``train`` suite, the same way in PyTorch and Flax (linen);
``compare.experiments.claims`` plans them and turns their records into verdicts.

Every run starts both frameworks from the *same* weights (the torch initialisation,
transferred) and feeds them the same batches in the same order (``compare.experiments.data.batches``).
Only the random draws differ (dropout masks, noisy BatchNorm: each framework draws its
own; ``compare.masks`` exists for exact comparisons, but here each framework trains as its
users would run it). Flax uses its stock BatchNorm statistics with torch's momentum (0.9
in Flax's direction). After training, the run's ``probes`` (``compare.experiments.probes``)
measure the trained network; the internal covariate shift is measured after every epoch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from compare import registry
from compare.experiments import data as datalib
from compare.experiments import nets, probes
from compare.records import TrainRecord

DIVERGED_LOSS = 1e3  # a training loss above this (or not finite) ends the run as diverged


@dataclasses.dataclass(frozen=True)
class RunConfig:
    claim: str  # the experiment: "learning_rate" | "overfitting" | "ics" | "order" (0.1: "batchnorm" | "dropout")
    model: str  # "mlp" | "cnn" (the claims' experiments use the lesson's mlp)
    use_bn: bool
    dropout: float
    lr: float
    epochs: int
    batch_size: int = 64
    seed: int = 0
    variant: str = "standard"  # compare.experiments.nets.VARIANTS
    train_size: int | None = None  # None: the whole training split; else a class-balanced subset
    label_noise: float = 0.0  # fraction of the subset's labels replaced by another class
    hidden: tuple[int, ...] | None = None  # mlp widths; None: (256, 256)
    probes: tuple[str, ...] = ()  # measured after training (PROBES), "ics" after every epoch
    track_steps: bool = False  # check the target accuracy (validation and test) after every step, not every epoch
    search: dict | None = None  # a run of a learning-rate search: its criterion and bracket (recorded as is)


PROBES = ("ics", "active_at_inference", "variance_shift", "ablation", "ensemble")
ABLATION_FRACTIONS = (0.25, 0.5, 0.75)
ABLATION_DRAWS = 8
ENSEMBLE_PASSES = 32


def model_spec(
    model: str, dataset: datalib.Dataset, use_bn: bool, dropout: float, hidden: tuple[int, ...] | None = None
) -> registry.ModelSpec:
    """The registry's mlp (widths ``hidden``, default 256-256) or cnn, sized for the dataset's images."""
    c, h, w = dataset.image_shape
    if model == "mlp":
        return registry.get("mlp").replace(
            in_features=c * h * w,
            hidden=tuple(hidden or (256, 256)),
            num_classes=dataset.num_classes,
            dropout=dropout,
            use_bn=use_bn,
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


def _loop(cfg: RunConfig, ds, net, target: float) -> dict:
    """Epochs of training with eval-mode metrics on every split after each (and the internal
    covariate shift when asked); stops early on divergence. The first step (or epoch) at
    which the eval-mode accuracy reaches ``target`` is counted on the test split and, when
    there is one, on the validation split."""
    splits = list(nets.splits(ds))
    curves = {f"{split}_{k}": [] for split in splits for k in ("loss", "acc")}
    ics: dict[str, dict[str, list[float]]] = {}
    probe_batch = next(datalib.batches(len(ds.x_train), cfg.batch_size, cfg.seed, 10**6))  # fixed, seen by both
    steps_per_epoch = len(ds.x_train) // cfg.batch_size
    reached = {split: None for split in ("test", "val") if split in splits}
    diverged = False
    t0 = time.perf_counter()

    def check(step: int) -> None:
        for split in [s for s, at in reached.items() if at is None]:
            if net.evaluate(split)[1] >= target:
                reached[split] = step

    for epoch in range(cfg.epochs):
        order = datalib.batches(len(ds.x_train), cfg.batch_size, cfg.seed, epoch)
        if cfg.track_steps and None in reached.values():
            losses = []
            for i, idx in enumerate(order):
                losses += net.train_epoch([idx])
                if not (math.isfinite(losses[-1]) and losses[-1] < DIVERGED_LOSS):
                    break
                check(epoch * steps_per_epoch + i + 1)
        else:
            losses = net.train_epoch(order)
        if not all(math.isfinite(v) and v < DIVERGED_LOSS for v in losses):
            diverged = True
            break
        for split in splits:
            loss, acc = net.evaluate(split)
            curves[f"{split}_loss"].append(loss)
            curves[f"{split}_acc"].append(acc)
        if not math.isfinite(curves["train_loss"][-1]):
            diverged = True
            break
        if "ics" in cfg.probes:
            for layer, m in probes.internal_covariate_shift(net, probe_batch).items():
                for k, v in m.items():
                    ics.setdefault(f"ics_{k}", {}).setdefault(layer, []).append(v)
        if not cfg.track_steps:
            for split, at in reached.items():
                if at is None and curves[f"{split}_acc"][-1] >= target:
                    reached[split] = (epoch + 1) * steps_per_epoch
    nan = float("nan")
    final = {k: (v[-1] if v and not diverged else nan) for k, v in curves.items()}
    out = {
        **{f"final_{k}": final[k] for k in ("train_loss", "train_acc", "test_loss", "test_acc")},
        "diverged": diverged,
        "steps_to_target": reached["test"],
        "wall_s": time.perf_counter() - t0,
        "curves": {k: [float(f"{v:.6g}") for v in vals] for k, vals in curves.items()},  # 6 digits: results.json's size
        "ics": ics,
        "target_check": "step" if cfg.track_steps else "epoch",
    }
    if "val" in reached:
        out |= {"final_val_acc": final["val_acc"], "val_steps_to_target": reached["val"]}
    return out


def _probe(cfg: RunConfig, net, diverged: bool) -> dict:
    """The end-of-run measurements the run asked for (none on a diverged run)."""
    unknown = sorted(set(cfg.probes) - set(PROBES))
    if unknown:
        raise ValueError(f"unknown probes {unknown}; known: {', '.join(PROBES)}")
    if diverged:
        return {}
    out: dict = {}
    if "active_at_inference" in cfg.probes:
        out |= probes.active_at_inference(net)
    if "variance_shift" in cfg.probes:
        out |= probes.variance_shift(net)
    if "ablation" in cfg.probes:
        out |= probes.ablation(net, ABLATION_FRACTIONS, ABLATION_DRAWS)
    if "ensemble" in cfg.probes:
        out |= probes.ensemble(net, ENSEMBLE_PASSES)
    return out


def run_one(
    cfg: RunConfig, ds: datalib.Dataset, frameworks=("torch", "linen"), target: float = 0.9, device: str = "cpu"
) -> list[dict]:
    """The run in every framework, from the same torch initialisation and the same batches;
    one record each. ``device`` ("cpu" or "gpu") is where torch trains; JAX trains on its
    default device."""
    if cfg.train_size is not None:
        ds = datalib.subset(ds, cfg.train_size, cfg.label_noise, seed=cfg.seed)
    spec = model_spec(cfg.model, ds, cfg.use_bn, cfg.dropout, cfg.hidden)
    torch.manual_seed(1000 + cfg.seed)  # the shared initial weights
    init = {k: v.clone() for k, v in spec.build_torch().state_dict().items()}
    records = []
    for fw in frameworks:
        net = nets.TorchNet(spec, ds, cfg, init, device) if fw == "torch" else nets.LinenNet(spec, ds, cfg, init)
        result = _loop(cfg, ds, net, target)
        ics = result.pop("ics")
        found = _probe(cfg, net, result["diverged"]) | ics
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
                variant=cfg.variant,
                train_size=len(ds.x_train),
                label_noise=cfg.label_noise,
                hidden=list(spec.config.hidden) if cfg.model == "mlp" else None,
                probes=found or None,
                search=cfg.search,
            ).to_dict()
        )
    return records


def run(
    runs: list[RunConfig],
    ds: datalib.Dataset,
    frameworks_of: Callable[[RunConfig], tuple[str, ...]] = lambda cfg: ("torch", "linen"),
    progress: Callable | None = None,
    target: float = 0.9,
    device: str = "cpu",
) -> list[dict]:
    """Every run, in the frameworks ``frameworks_of(run)`` names (torch on ``device``)."""
    records = []
    for cfg in runs:
        records += run_one(cfg, ds, frameworks_of(cfg), target=target, device=device)
        if progress:
            progress(f"{cfg.claim}: bn={cfg.use_bn} p={cfg.dropout} lr={cfg.lr} {cfg.variant} seed {cfg.seed}")
    return records
