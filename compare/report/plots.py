"""PNG figures for report.md, drawn with matplotlib's Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from compare.experiments.claims import generalisation_gap


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def divergence(records: list[dict], path: Path) -> Path | None:
    """Per-step max relative parameter difference, torch vs Flax, float32 and float64."""
    curves = [r for r in records if r.get("divergence_float32")]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in curves:
        label = f"{r['model']} / {r['flax_api']}"
        steps = range(1, len(r["divergence_float32"]) + 1)
        (line,) = ax.plot(steps, r["divergence_float32"], label=f"{label}, float32")
        ax.plot(steps, r["divergence_float64"], linestyle="--", color=line.get_color(), label=f"{label}, float64")
    ax.set_yscale("log")
    ax.set_xlabel("training step (same weights, batches and dropout masks)")
    ax.set_ylabel("max relative difference of parameters and statistics")
    ax.set_title("torch vs Flax training trajectories (linen and nnx coincide)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def throughput(records: list[dict], path: Path) -> Path | None:
    """samples/s against batch size, log-log, one panel per (model, dtype), one line per impl."""
    panels = sorted({(r["model"], r["dtype"]) for r in records})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (model, dtype) in zip(axes[0], panels, strict=True):
        recs = [r for r in records if (r["model"], r["dtype"]) == (model, dtype)]
        for impl in sorted({r["impl"] for r in recs}):
            pts = sorted((r["batch_size"], r["samples_per_s"]) for r in recs if r["impl"] == impl)
            style = "-" if impl.startswith("jax") else "--"
            ax.plot(*zip(*pts, strict=True), style, marker="o", markersize=3, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{model} ({dtype})")
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("training samples / s")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"training throughput on {records[0]['device']} (solid: JAX, dashed: PyTorch)")
    return _save(fig, path)


def compile_vs_steady(records: list[dict], path: Path) -> Path | None:
    """Per (model, dtype) at its largest batch: compile time and steady-state step time."""
    if not records:
        return None
    keys = sorted({(r["model"], r["dtype"]) for r in records})
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6), squeeze=False)
    for col, (model, dtype) in enumerate(keys):
        recs = [r for r in records if (r["model"], r["dtype"]) == (model, dtype)]
        batch = max(r["batch_size"] for r in recs)
        recs = sorted((r for r in recs if r["batch_size"] == batch), key=lambda r: r["impl"])
        names = [r["impl"] for r in recs]
        axes[0][col].barh(names, [r["compile_s"] for r in recs], color="tab:orange")
        axes[0][col].set_title(f"{model} ({dtype}), batch {batch}")
        axes[0][col].set_xlabel("compile: time to first step (s)")
        axes[1][col].barh(names, [r["step_ms_median"] for r in recs], xerr=None, color="tab:blue")
        axes[1][col].set_xlabel("steady state: median step (ms)")
    return _save(fig, path)


def _lr_sweep(records: list[dict], *, one_seed: bool = False) -> list[dict]:
    """The learning-rate runs with and without BatchNorm (no Dropout, the lesson's order);
    0.2's ``batchnorm`` runs too. ``one_seed``: the first seed only."""
    recs = [
        r
        for r in records
        if r["claim"] in ("batchnorm", "learning_rate")
        and r["dropout"] == 0
        and r.get("variant", "standard") == "standard"
    ]
    first = min((r["seed"] for r in recs), default=0)
    return [r for r in recs if r["seed"] == first] if one_seed else recs


def learning_curves(records: list[dict], path: Path) -> Path | None:
    """BatchNorm: test accuracy per epoch, torch (solid) and linen (dashed) on the same
    axes, one panel per (model, with/without BN), one colour per learning rate (first seed)."""
    recs = _lr_sweep(records, one_seed=True)
    if not recs:
        return None
    panels = sorted({(r["model"], r["use_bn"]) for r in recs}, key=lambda k: (k[0], not k[1]))
    lrs = sorted({r["lr"] for r in recs})
    colours = dict(zip(lrs, plt.cm.viridis(np.linspace(0, 0.9, len(lrs))), strict=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (model, use_bn) in zip(axes[0], panels, strict=True):
        for r in recs:
            if (r["model"], r["use_bn"]) != (model, use_bn):
                continue
            acc = r["curves"]["test_acc"]
            style = "-" if r["framework"] == "torch" else "--"
            label = f"lr {r['lr']} ({r['framework']})" + (" diverged" if r["diverged"] else "")
            ax.plot(range(1, len(acc) + 1), acc, style, color=colours[r["lr"]], label=label)
        ax.set_title(f"{model}, {'with' if use_bn else 'without'} BatchNorm")
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=6)
    return _save(fig, path)


def accuracy_vs_lr(records: list[dict], path: Path) -> Path | None:
    """BatchNorm: final test accuracy against learning rate (diverged runs at 0; first seed)."""
    recs = _lr_sweep(records, one_seed=True)
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["model"], r["use_bn"], r["framework"]) for r in recs}):
        pts = sorted(
            (r["lr"], 0.0 if r["diverged"] else r["final_test_acc"])
            for r in recs
            if (r["model"], r["use_bn"], r["framework"]) == key
        )
        model, use_bn, fw = key
        ax.plot(
            *zip(*pts, strict=True),
            "-" if fw == "torch" else "--",
            marker="o" if use_bn else "x",
            label=f"{model} {'BN' if use_bn else 'no BN'} ({fw})",
        )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD, momentum 0.9)")
    ax.set_ylabel("final test accuracy (diverged: 0)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def gap_vs_dropout(records: list[dict], path: Path) -> Path | None:
    """Dropout claim: generalisation gap (test - train loss) against the dropout rate."""

    recs = [r for r in records if r["claim"] in ("dropout", "overfitting") and not r["use_bn"]]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for model, fw in sorted({(r["model"], r["framework"]) for r in recs}):
        ps = sorted({r["dropout"] for r in recs if r["model"] == model})
        gaps = [
            np.mean(
                [generalisation_gap(r) for r in recs if (r["model"], r["framework"], r["dropout"]) == (model, fw, p)]
            )
            for p in ps
        ]
        ax.plot(ps, gaps, "-" if fw == "torch" else "--", marker="o", label=f"{model} ({fw})")
    ax.set_xlabel("dropout rate p")
    ax.set_ylabel("test loss - train loss (eval mode)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
