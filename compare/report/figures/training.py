"""The figures of the ``train`` suite's runs (the claims' own figures are in ``claims``): learning
curves, accuracy against the learning rate, the generalisation gap with and without Dropout.

Every seed is in them: a line is the mean over a framework's seeds and its band their range;
torch is drawn solid with circles, linen dashed with squares (``claims.band``); a panel per
dataset. Runs of 0.2 (one seed, ``batchnorm``/``dropout`` experiments) are drawn the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compare.experiments.claims import generalisation_gap
from compare.report.figures.bands import ARM_COLOUR, FRAMEWORKS, MARK, band, legend, log_plain, save
from compare.report.figures.style import plt


def _lr_sweep(records: list[dict]) -> list[dict]:
    """The learning-rate grid with and without BatchNorm (no Dropout, the lesson's order);
    0.2's ``batchnorm`` runs too."""
    return [
        r
        for r in records
        if r["claim"] in ("batchnorm", "learning_rate")
        and r["dropout"] == 0
        and r.get("variant", "standard") == "standard"
        and r["model"] == "mlp"
    ]


def _datasets(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(r.get("dataset", "?") for r in records))


def _fws(records: list[dict]) -> list[str]:
    return [fw for fw in FRAMEWORKS if any(r["framework"] == fw for r in records)]


def learning_curves(records: list[dict], path: Path) -> Path | None:
    """Test accuracy per epoch, one panel per (dataset, with / without BatchNorm), one colour
    per learning rate; every seed aggregated, both frameworks."""
    recs = _lr_sweep(records)
    if not recs:
        return None
    datasets = _datasets(recs)
    lrs = sorted({r["lr"] for r in recs})
    colours = dict(zip(lrs, plt.cm.viridis(np.linspace(0, 0.9, len(lrs))), strict=True))
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.6 * len(datasets)), squeeze=False, sharey=True,
                             layout="constrained")  # fmt: skip
    for row, ds in zip(axes, datasets, strict=True):
        for ax, use_bn in zip(row, (True, False), strict=True):
            diverged = []
            for fw in _fws(recs):
                for lr in lrs:
                    rs = [
                        r
                        for r in recs
                        if (r.get("dataset", "?"), r["use_bn"], r["framework"], r["lr"]) == (ds, use_bn, fw, lr)
                    ]
                    if rs:
                        curves = [r["curves"]["test_acc"] for r in rs]
                        x = np.arange(1, 1 + max(map(len, curves)))
                        band(ax, x, curves, colours[lr], fw, f"lr {lr:g}, {fw}")
                        if any(r["diverged"] for r in rs):
                            diverged.append(f"lr {lr:g} {fw}: {sum(r['diverged'] for r in rs)} of {len(rs)}")
            if diverged:
                ax.text(0.98, 0.03, "diverged (curves of the others):\n" + "\n".join(diverged), transform=ax.transAxes,
                        ha="right", va="bottom", fontsize=6, bbox=dict(facecolor="white", alpha=0.8, lw=0))  # fmt: skip
            n = {
                fw: len({r["seed"] for r in recs if r["framework"] == fw and r.get("dataset", "?") == ds})
                for fw in _fws(recs)
            }
            seeds = ", ".join(f"{fw} {k} seeds" for fw, k in n.items())
            ax.set_title(f"{ds}, {'with' if use_bn else 'without'} BatchNorm ({seeds}; band: their range)", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(True, alpha=0.3)
        row[0].set_ylabel("test accuracy (eval mode)")
    labels = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    legend(fig, list(labels.values()), list(labels))
    return save(fig, path)


def accuracy_vs_lr(records: list[dict], path: Path) -> Path | None:
    """Final test accuracy against learning rate (diverged runs at 0), with BatchNorm,
    without, and with Dropout; every seed aggregated, both frameworks; a panel per dataset."""
    recs = [
        r
        for r in records
        if r["claim"] in ("batchnorm", "learning_rate") and r.get("variant", "standard") == "standard"
    ]
    if not recs:
        return None
    datasets = _datasets(recs)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.4), squeeze=False, layout="constrained")
    for ax, ds in zip(axes[0], datasets, strict=True):
        for fw in _fws(recs):
            for arm, use_bn, dropped in (("BatchNorm", True, False), ("plain", False, False), ("Dropout", False, True)):
                rs = [r for r in recs if (r.get("dataset", "?"), r["framework"], r["use_bn"]) == (ds, fw, use_bn)
                      and (r["dropout"] > 0) == dropped]  # fmt: skip
                if not rs:
                    continue
                lrs = sorted({r["lr"] for r in rs})
                seeds = sorted({r["seed"] for r in rs})
                rows = [[next((0.0 if r["diverged"] else r["final_test_acc"] for r in rs if (r["seed"], r["lr"]) == (s, lr)),
                              np.nan) for lr in lrs] for s in seeds]  # fmt: skip
                band(ax, lrs, rows, ARM_COLOUR[arm], fw, f"{arm}, {fw} ({len(seeds)} seeds)")
        ax.set_xscale("log")
        log_plain(ax.xaxis)
        ax.set_title(ds, fontsize=9)
        ax.set_xlabel("learning rate (SGD, momentum 0.9)")
        ax.set_ylabel("final test accuracy (diverged: 0)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)


def gap_vs_dropout(records: list[dict], path: Path) -> Path | None:
    """The generalisation gap without and with Dropout (and with BatchNorm), two categories,
    so dots per seed and their mean with a standard deviation, no line between them; a
    panel per dataset and regime."""
    recs = [r for r in records if r["claim"] in ("dropout", "overfitting")]
    if not recs:
        return None
    panels = list(dict.fromkeys((r.get("dataset", "?"), bool(r.get("label_noise"))) for r in recs))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False, layout="constrained")
    arms = [("no BN, no Dropout", False, False), ("Dropout", False, True), ("BatchNorm", True, False)]
    for ax, (ds, noisy) in zip(axes[0], panels, strict=True):
        for i, (_name, use_bn, dropped) in enumerate(arms):
            for j, fw in enumerate(_fws(recs)):
                rs = [r for r in recs if (r.get("dataset", "?"), bool(r.get("label_noise")), r["framework"], r["use_bn"])
                      == (ds, noisy, fw, use_bn) and (r["dropout"] > 0) == dropped]  # fmt: skip
                gaps = [g for g in map(generalisation_gap, rs) if np.isfinite(g)]
                if not gaps:
                    continue
                x = i + (j - 0.5) * 0.3
                colour = ARM_COLOUR["plain" if not (use_bn or dropped) else ("BatchNorm" if use_bn else "Dropout")]
                ax.scatter(
                    x + np.linspace(-0.08, 0.08, len(gaps)), gaps, marker=MARK[fw], s=10, color=colour, alpha=0.5
                )
                ax.errorbar(x, np.mean(gaps), yerr=np.std(gaps), fmt=MARK[fw], color="k", capsize=3, ms=5,
                            mfc="white" if fw == "linen" else "k", label=f"mean, sd: {fw}" if i == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(arms)), [a[0] for a in arms], fontsize=8)
        ax.set_xlim(-0.6, len(arms) - 0.4)
        noise = next(
            (r.get("label_noise") for r in recs if r.get("dataset", "?") == ds and bool(r.get("label_noise")) == noisy),
            0,
        )
        ax.set_title(f"{ds}, " + (f"{noise:.0%} of labels wrong" if noisy else "clean labels"), fontsize=9)
        ax.set_ylabel("test loss - train loss (eval mode;\ntraining images whose labels are right)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, path)
