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
    """Epochs of training with eval-mode metrics after each (and the internal covariate
    shift when asked); stops early on divergence."""
    curves = {k: [] for k in ("train_loss", "train_acc", "test_loss", "test_acc")}
    ics = []
    probe_batch = next(datalib.batches(len(ds.x_train), cfg.batch_size, cfg.seed, 10**6))  # fixed, seen by both
    steps_per_epoch = len(ds.x_train) // cfg.batch_size
    diverged, steps_to_target = False, None
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        losses = net.train_epoch(datalib.batches(len(ds.x_train), cfg.batch_size, cfg.seed, epoch))
        if not all(math.isfinite(v) and v < DIVERGED_LOSS for v in losses):
            diverged = True
            break
        for split in ("train", "test"):
            loss, acc = net.evaluate(split)
            curves[f"{split}_loss"].append(loss)
            curves[f"{split}_acc"].append(acc)
        if not math.isfinite(curves["train_loss"][-1]):
            diverged = True
            break
        if "ics" in cfg.probes:
            ics.append(probes.internal_covariate_shift(net, probe_batch))
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
        "ics": ics,
    }


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
        ds = datalib.subset(ds, cfg.train_size, cfg.label_noise)
    spec = model_spec(cfg.model, ds, cfg.use_bn, cfg.dropout, cfg.hidden)
    torch.manual_seed(1000 + cfg.seed)  # the shared initial weights
    init = {k: v.clone() for k, v in spec.build_torch().state_dict().items()}
    records = []
    for fw in frameworks:
        net = nets.TorchNet(spec, ds, cfg, init, device) if fw == "torch" else nets.LinenNet(spec, ds, cfg, init)
        result = _loop(cfg, ds, net, target)
        ics = result.pop("ics")
        found = _probe(cfg, net, result["diverged"]) | ({"ics": ics} if ics else {})
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
