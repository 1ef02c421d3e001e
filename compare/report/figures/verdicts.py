"""The figures of a run's verdicts: every interval over its minimum effect
(``claims_intervals.png``), every seed's paired effect (``claims_per_seed.png``), and the
facts of eval mode checked on every probed network (``facts_at_inference.png``)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.ticker import FixedLocator, FuncFormatter

from compare.experiments.claims.effects import REGIMES
from compare.report.figures.bands import FRAMEWORKS, MARK, plain, save
from compare.report.figures.style import plt


def facts(records: list[dict], out: Path) -> Path | None:
    """BatchNorm's relative change per layer in eval mode (it is applied), its affine residual
    and batch dependence (it is a fixed map), and Dropout's change (exactly 0), every network."""
    probed = [r for r in records if "bn_change_per_layer" in (r.get("probes") or {})]
    drops = [r for r in records if r["dropout"] > 0 and "dropout_change" in (r.get("probes") or {})]
    if not probed and not drops:
        return None
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4), layout="constrained")
    fws = [fw for fw in FRAMEWORKS if any(r["framework"] == fw for r in probed + drops)]
    layers = sorted({k for r in probed for k in r["probes"]["bn_change_per_layer"]})
    for j, fw in enumerate(fws):
        rs = [r for r in probed if r["framework"] == fw]
        for k, name in enumerate(layers):
            vals = [r["probes"]["bn_change_per_layer"][name] for r in rs]
            if vals:
                bar = a.bar(k + (j - 0.5) * 0.4, np.mean(vals), 0.38, yerr=np.std(vals), capsize=2, color=f"C{j}",
                            label=f"{fw} ({len(vals)} networks)" if k == 0 else None)  # fmt: skip
                a.bar_label(bar, fmt="%.2f", fontsize=7, padding=2)
        for key in ("bn_affine_residual", "bn_batch_dependence"):  # the framework's colour, as in the other panels
            vals = [max(r["probes"][key], 1e-12) for r in rs]
            x = (0 if key == "bn_affine_residual" else 1) + (j - 0.5) * 0.25 + np.linspace(-0.08, 0.08, len(vals))
            b.scatter(
                x,
                vals,
                marker=MARK[fw],
                s=12,
                color=f"C{j}",
                alpha=0.6,
                label=f"{fw}" if key == "bn_affine_residual" else None,
            )
        ds = [r for r in drops if r["framework"] == fw]
        vals = [r["probes"]["dropout_change"] for r in ds]
        c.scatter(j + np.linspace(-0.2, 0.2, len(vals)), vals, marker=MARK[fw], s=14, color=f"C{j}",
                  label=f"{fw} ({len(vals)} networks)")  # fmt: skip
        if vals and max(vals) == 0.0:
            c.annotate(f"exactly 0 in all {len(vals)}", (j, 0.0), xytext=(0, 12), textcoords="offset points",
                       ha="center", fontsize=8)  # fmt: skip
    a.set_xticks(range(len(layers)), layers)
    a.set_ylabel("||eval-mode output - input|| / ||input||")
    a.set_title("BatchNorm is applied at inference\n(relative change it makes; test set)", fontsize=9)
    a.legend(fontsize=7)
    b.set_yscale("log")
    b.set_xticks(
        [0, 1], ["affine residual\n(per channel, least squares)", "batch dependence\n(logits alone vs in batch)"]
    )
    b.axhline(1e-4, color="k", lw=0.8, ls=":", label="bound 1e-4")
    b.set_ylim(1e-13, 1e-2)
    b.set_title("...as a fixed per-channel affine map\n(0 drawn at 1e-12)", fontsize=9)
    b.legend(fontsize=7)
    c.set_xticks(range(len(fws)), fws)
    c.set_xlim(-0.6, len(fws) - 0.4)
    c.set_ylim(-0.01, 0.05)
    c.axhline(0.01, color="tab:red", lw=0.8, ls=":", label="1% change")
    c.set_ylabel("||eval-mode output - input|| / ||input||")
    c.set_title("Dropout is the identity at inference", fontsize=9)
    c.legend(fontsize=7)
    for ax in (a, b, c):
        ax.grid(True, alpha=0.3)
    return save(fig, out / "facts_at_inference.png")


def _row_label(c: dict) -> str:
    regime = f", {REGIMES[c['regime']]}" if c.get("regime") else ""
    second = " [beside the family]" if c.get("in_family") is False else ""
    return f"{c['statement'][:58]}{'...' if len(c['statement']) > 58 else ''} ({c.get('dataset', '?')}{regime}){second}"


def intervals(claims: list[dict], ax) -> None:
    """Every verdict's effect over its minimum effect, with its interval: 1 is the claim's
    threshold, 0 no effect, -1 the threshold of the opposite."""
    rows = [c for c in claims if c.get("effect") is not None]
    colour = {"holds": "tab:green", "does not hold": "tab:red", "negligible": "tab:olive", "inconclusive": "tab:purple"}
    ends = [0.0, 1.0, -1.0]
    for i, c in enumerate(rows):
        m = c["min_effect"]
        lo, mid, hi = c["ci_low"] / m, c["effect"] / m, c["ci_high"] / m
        ends += [lo, hi]
        ax.errorbar(mid, i, xerr=[[mid - lo], [hi - mid]], fmt="o", color=colour[c["verdict"]], capsize=3, ms=4)
    ax.set_yticks(range(len(rows)), [_row_label(c) for c in rows], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(1, color="tab:green", lw=0.8, ls="--")
    ax.axvline(-1, color="tab:red", lw=0.8, ls=":")
    ax.set_xscale("symlog", linthresh=1.0)
    span = max(abs(min(ends)), abs(max(ends)))
    ticks = [t for t in (0, 1, 3, 10, 30, 100, 300, 1000, 3000) if t <= span * 1.5 or t <= 3]
    ticks = sorted({-t for t in ticks if t <= abs(min(ends)) * 1.5 or t <= 1} | set(ticks))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(plain))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    pad = lambda v: v * 1.3 if abs(v) > 1 else v + math.copysign(0.3, v)  # noqa: E731
    ax.set_xlim(pad(min(ends)), pad(max(ends)))
    handles = [ax.plot([], [], "o", color=col)[0] for col in colour.values()]
    ax.figure.legend(handles, [f"verdict: {v}" for v in colour], loc="outside lower center", ncols=4, fontsize=7)
    level = next((c.get("level") for c in rows if c.get("level")), 0.95)
    ax.set_xlabel(f"effect / minimum effect, with its {level:.2%} interval\n(1: the claim's threshold, 0: no effect;"
                  " symmetric-log axis)")  # fmt: skip
    ax.grid(True, axis="x", alpha=0.3)


def per_seed(claims: list[dict], out: Path) -> Path | None:
    """Every seed's paired effect, per row of the family, torch and linen apart, with the
    pooled estimate and its interval and the minimum effect."""
    rows = [c for c in claims if c.get("per_seed") and c.get("per_seed_frameworks")]
    if not rows:
        return None
    cols = 4
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.0 * cols, 2.6 * nrows), squeeze=False, layout="constrained")
    for ax, c in zip(axes.flat, rows, strict=False):
        for j, fw in enumerate(FRAMEWORKS):
            vals = [e for e, f in zip(c["per_seed"], c["per_seed_frameworks"], strict=True) if f == fw]
            if vals:
                x = j + np.linspace(-0.25, 0.25, len(vals))
                ax.scatter(x, vals, marker=MARK[fw], s=12, color=f"C{j}", alpha=0.7)
        if c.get("effect") is not None:
            ax.errorbar(2, c["effect"], yerr=[[c["effect"] - c["ci_low"]], [c["ci_high"] - c["effect"]]], fmt="D",
                        color="k", capsize=3, ms=4)  # fmt: skip
        m = c["min_effect"]
        ax.axhline(0, color="k", lw=0.6)
        ax.axhline(m, color="tab:green", lw=0.8, ls="--")
        if c["lesson"].startswith("no"):
            ax.axhline(-m, color="tab:green", lw=0.8, ls="--")
        ax.set_xticks([0, 1, 2], ["torch", "linen", "pooled"], fontsize=7)
        ax.set_xlim(-0.6, 2.6)
        ax.tick_params(axis="y", labelsize=7)
        regime = f", {c['regime']}" if c.get("regime") else ""
        name = textwrap.shorten(c["statement"], 52, placeholder="...")
        ax.set_title(f"{name}\n({c.get('dataset', '?')}{regime}): {c['verdict']}", fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in axes.flat[len(rows) :]:
        ax.remove()
    fig.suptitle("Each seed's paired effect (dots), the pooled estimate with its interval (diamond),"
                 " the minimum effect (dashed)", fontsize=9)  # fmt: skip
    return save(fig, out / "claims_per_seed.png")
