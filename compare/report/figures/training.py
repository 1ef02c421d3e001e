"""The figures of the ``train`` suite's runs (the claims' own figures are in ``claims``): learning
curves, accuracy against the learning rate, the generalisation gap against Dropout."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compare.experiments.claims import generalisation_gap
from compare.report.figures.style import plt, save


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
    return save(fig, path)


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
    return save(fig, path)


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
    return save(fig, path)
