"""The claims' figures, from the ``train`` suite's records and verdicts: one per claim
(``claim_<claim>.png``, a panel per dataset and regime); :func:`draw_all` adds the figures
of the verdicts (``verdicts``: intervals, per-seed effects, the facts of eval mode).

Both frameworks are always drawn: torch solid with circles, linen dashed with squares. A
line is the mean over a framework's seeds and its band the range of those seeds (the
count is in the legend). Every figure uses constrained layout, so no label is cut off.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from compare.experiments.claims import ABLATED_FRACTION, ROW, STABLE_ACCURACY, select
from compare.experiments.claims.effects import REGIMES, arm_largest_lr, lr_arm
from compare.experiments.claims.effects import Runs as _Runs
from compare.experiments.claims.facts import FACT
from compare.report.figures import verdicts
from compare.report.figures.bands import ARM_COLOUR, FRAMEWORKS, LINE, MARK, band, darker, legend, log_plain, save
from compare.report.figures.style import plt

__all__ = ["DRAW", "FRAMEWORKS", "draw_all", "draw_claim", "path_of"]


def _frameworks(records: list[dict]) -> list[str]:
    return [fw for fw in FRAMEWORKS if any(r["framework"] == fw for r in records)]


def _panels(records: list[dict], experiment: str, by_regime: bool = False) -> list[tuple[str, str | None]]:
    rs = [r for r in records if r["claim"] == experiment]
    datasets = list(dict.fromkeys(r["dataset"] for r in rs))
    if not by_regime:
        return [(d, None) for d in datasets]
    return [
        (d, g) for d in datasets for g in ("clean", "noisy") if any(_regime(r) == g for r in rs if r["dataset"] == d)
    ]


def _regime(r: dict) -> str:
    return "noisy" if r.get("label_noise") else "clean"


def _label(name: str, fw: str, n: int) -> str:
    return f"{name}, {fw} ({n} seeds)"


def _grid(records, ds, fw, arm) -> dict[int, list[dict]]:
    """seed -> the arm's learning-rate grid (lesson's order), one framework and dataset."""
    runs = _Runs(records, fw, ds)
    return {s: lr_arm(runs, s, arm) for s in runs.seeds if lr_arm(runs, s, arm)}


def _by_lr(grid: dict[int, list[dict]], value: Callable[[dict], float]) -> tuple[list[float], list[list[float]]]:
    lrs = sorted({r["lr"] for runs in grid.values() for r in runs})
    rows = [[next((value(r) for r in runs if r["lr"] == lr), np.nan) for lr in lrs] for runs in grid.values()]
    return lrs, rows


# --- one function per claim: (records, ax, dataset, regime) ----------------------------------------


def speed(records, ax, ds, _regime_name) -> None:
    for fw in _frameworks(records):
        for arm in ("BatchNorm", "plain"):
            grid = _grid(records, ds, fw, arm)
            lrs, rows = _by_lr(grid, lambda r: np.nan if r["steps_to_target"] is None else r["steps_to_target"])
            band(ax, lrs, rows, ARM_COLOUR[arm], fw, _label(arm, fw, len(rows)))
    ax.set_xscale("log")
    log_plain(ax.xaxis)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("steps to the target test accuracy\n(checked every step; no point: not reached)")


def _estimates(ax, records, ds, arm, criterion, y) -> None:
    """Each framework's per-seed bisection estimates of the largest lr, as a range and mean."""
    for k, fw in enumerate(_frameworks(records)):
        runs = _Runs(records, fw, ds)
        est = [arm_largest_lr(runs, s, arm, criterion)[0] for s in runs.seeds if lr_arm(runs, s, arm)]
        if est:
            g = 10 ** np.mean(np.log10(est))
            ax.errorbar(g, y + (0.03 if k else 0.0), xerr=[[max(0.0, g - min(est))], [max(0.0, max(est) - g)]], fmt=MARK[fw],
                        color=ARM_COLOUR[arm], capsize=3, ms=5, mfc="white" if fw == "linen" else ARM_COLOUR[arm])  # fmt: skip


def higher_lr(records, ax, ds, _regime_name) -> None:
    target = next((r["target_accuracy"] for r in records if r["dataset"] == ds and r["claim"] == "learning_rate"), 0.9)
    for fw in _frameworks(records):
        for arm in ("BatchNorm", "plain"):
            grid = _grid(records, ds, fw, arm)
            lrs, rows = _by_lr(grid, lambda r: 0.0 if r["diverged"] else r.get("final_val_acc", r["final_test_acc"]))
            band(ax, lrs, rows, ARM_COLOUR[arm], fw, _label(arm, fw, len(rows)))
    for arm in ("BatchNorm", "plain"):
        _estimates(ax, records, ds, arm, "target", target + 0.04)
    ax.axhline(target, color="k", lw=0.8, ls=":", label=f"target {target:.0%}")
    ax.set_xscale("log")
    log_plain(ax.xaxis)
    ax.set_ylim(-0.02, 1.1)
    ax.set_xlabel("learning rate (bars: the seeds' largest lr reaching\nthe target, by bisection; mean and range)")
    ax.set_ylabel("final validation accuracy (diverged: 0)")


def _stable(r: dict) -> float:
    return float(not r["diverged"] and r.get("final_val_acc", r["final_test_acc"]) >= STABLE_ACCURACY)


def stability(arms: tuple[str, ...]) -> Callable:
    def draw(records, ax, ds, _regime_name) -> None:
        for fw in _frameworks(records):
            for arm in arms:
                grid = _grid(records, ds, fw, arm)
                lrs, rows = _by_lr(grid, _stable)
                band(ax, lrs, rows, ARM_COLOUR[arm], fw, _label(arm, fw, len(rows)), spread=False)
        for arm in arms:
            _estimates(ax, records, ds, arm, "stable", 1.06)
        ax.set_xscale("log")
        log_plain(ax.xaxis)
        ax.set_ylim(-0.05, 1.15)
        ax.set_xlabel("learning rate (bars at the top: the seeds' largest\nstable lr, by bisection; mean and range)")
        ax.set_ylabel(f"fraction of seeds stable\n(no divergence, validation accuracy >= {STABLE_ACCURACY:.0%})")

    return draw


def ics(layer: str) -> Callable:
    arms = (("BatchNorm", dict(use_bn=True, variant="standard")), ("plain", dict(use_bn=False, variant="standard")),
            ("noisy BatchNorm", dict(use_bn=True, variant="noisy_bn")))  # fmt: skip

    def draw(records, ax, ds, _regime_name) -> None:
        for fw in _frameworks(records):
            for name, match in arms:
                rs = [r for r in select(records, "learning_rate", framework=fw, dataset=ds, **match)
                      if "ics_l2" in (r.get("probes") or {})]  # fmt: skip
                rows = [r["probes"]["ics_l2"].get(layer, []) for r in rs]
                if any(rows):
                    x = np.arange(1, 1 + max(map(len, rows)))
                    band(ax, x, rows, ARM_COLOUR[name], fw, _label(name, fw, len(rows)))
        ax.set_yscale("log")
        log_plain(ax.yaxis)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"ICS at {layer}: ||G - G'||\n(the layers before take the optimizer's step)")

    return draw


def overfitting(arm: str) -> Callable:
    def draw(records, ax, ds, regime) -> None:
        for fw in _frameworks(records):
            for name in ("plain", arm):
                rs = [r for r in select(records, "overfitting", framework=fw, dataset=ds) if _regime(r) == regime
                      and r["use_bn"] == (name == "BatchNorm") and (r["dropout"] > 0) == (name == "Dropout")]  # fmt: skip
                if not rs:
                    continue
                x = np.arange(1, 1 + max(len(r["curves"]["test_loss"]) for r in rs))
                band(
                    ax,
                    x,
                    [r["curves"]["test_loss"] for r in rs],
                    ARM_COLOUR[name],
                    fw,
                    _label(f"{name}: test", fw, len(rs)),
                )
                train = [r["curves"].get("train_clean_loss") or r["curves"]["train_loss"] for r in rs]
                band(ax, x, train, ARM_COLOUR[name], fw, f"{name}: train, right labels, {fw}", spread=False)
                ax.lines[-1].set(linestyle=":", marker="", lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (eval mode)")
        ax.set_yscale("log")
        log_plain(ax.yaxis)

    return draw


def reliance(records, ax, ds, _regime_name) -> None:
    for fw in _frameworks(records):
        for name in ("plain", "Dropout"):
            rs = [r for r in select(records, "learning_rate", framework=fw, dataset=ds, use_bn=False, variant="standard")
                  if "ablation_acc" in (r.get("probes") or {}) and (r["dropout"] > 0) == (name == "Dropout")]  # fmt: skip
            if not rs:
                continue
            for key, colour in (
                ("ablation_acc_rescaled", ARM_COLOUR[name]),
                ("ablation_acc", darker(ARM_COLOUR[name])),
            ):
                if key not in rs[0]["probes"] or not rs[0]["probes"][key]:
                    continue
                fracs = [0.0, *sorted(float(f) for f in rs[0]["probes"][key])]
                rows = [[r["probes"]["ablation_full_acc"], *(r["probes"][key][str(f)] for f in fracs[1:])] for r in rs]
                what = "rescaled 1/(1-f)" if key.endswith("rescaled") else "not rescaled"
                band(ax, fracs, rows, colour, fw, _label(f"{name}, {what}", fw, len(rs)))
    ax.axvline(ABLATED_FRACTION, color="k", lw=0.8, ls=":")
    ax.set_xlabel("fraction f of hidden units ablated at test time")
    ax.set_ylabel("test accuracy")


def ensemble(records, ax, ds, _regime_name) -> None:
    for fw in _frameworks(records):
        rs = [r for r in select(records, "learning_rate", framework=fw, dataset=ds)
              if "mc_acc_by_members" in (r.get("probes") or {})]  # fmt: skip
        if not rs:
            continue
        ks = sorted(int(k) for k in rs[0]["probes"]["mc_acc_by_members"])
        rows = [[r["probes"]["mc_acc_by_members"][str(k)] for k in ks] for r in rs]
        band(ax, ks, rows, ARM_COLOUR["Dropout"], fw, _label("Monte-Carlo ensemble", fw, len(rs)))
        ax.axhline(np.mean([r["probes"]["eval_acc"] for r in rs]), color="tab:blue", ls=LINE[fw],
                   label=f"eval mode (weight scaling), {fw}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("thinned networks averaged (1: a single one)")
    ax.set_ylabel("test accuracy")


def order(records, ax, ds, _regime_name) -> None:
    variants = ("standard", "dropout_before_bn", "dropout_last_only")
    fws = _frameworks(records)
    rs = select(records, "order", dataset=ds)
    layers = sorted({k for r in rs for k in (r.get("probes") or {}).get("variance_ratio", {})})
    width = 0.8 / max(1, len(layers) * len(fws))
    for i, v in enumerate(variants):
        for j, fw in enumerate(fws):
            ratios = [r["probes"]["variance_ratio"] for r in rs if r["framework"] == fw and r.get("variant") == v
                      and "variance_ratio" in (r.get("probes") or {})]  # fmt: skip
            for k, name in enumerate(layers):
                if not ratios:
                    continue
                vals = [x[name] for x in ratios]
                pos = i + (k * len(fws) + j - (len(layers) * len(fws) - 1) / 2) * width
                ax.bar(pos, np.mean(vals), width, yerr=np.std(vals), color=f"C{k}", alpha=1.0 if fw == "torch" else 0.5,
                       hatch=None if fw == "torch" else "//", capsize=2,
                       label=f"{name}, {fw} ({len(vals)} seeds)" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(variants)), ["lesson's order", "Dropout before BN", "Dropout after last BN only"])
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_ylabel("running variance / eval-mode variance\nof BatchNorm's input (bars: mean, sd over seeds)")


DRAW: dict[str, tuple[Callable | tuple[Callable, ...], bool]] = {  # claim -> (draw(s), one panel per regime)
    "bn_speeds_up_training": (speed, False),
    "bn_allows_higher_learning_rates": (higher_lr, False),
    "bn_reduces_internal_covariate_shift": ((ics("fc2"), ics("head")), False),
    "bn_improves_stability": (stability(("BatchNorm", "plain")), False),
    "dropout_improves_stability": (stability(("Dropout", "plain")), False),
    "bn_reduces_overfitting": (overfitting("BatchNorm"), True),
    "dropout_reduces_overfitting": (overfitting("Dropout"), True),
    "dropout_stops_reliance_on_particular_neurons": (reliance, False),
    "dropout_behaves_like_an_implicit_ensemble": (ensemble, False),
    "order_avoids_variance_shift": (order, False),
}


def path_of(claim: str) -> str:
    return "facts_at_inference.png" if claim in FACT else f"claim_{claim}.png"


def draw_claim(records: list[dict], claim: str, out: Path) -> Path | None:
    """One panel per dataset (and regime, and each of several measures), one legend."""
    draw, by_regime = DRAW[claim]
    panels = [(d, g, f) for d, g in _panels(records, ROW[claim].experiment, by_regime)
              for f in (draw if isinstance(draw, tuple) else (draw,))]  # fmt: skip
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False, layout="constrained")
    labels: dict[str, object] = {}
    for ax, (ds, regime, f) in zip(axes[0], panels, strict=True):
        f(records, ax, ds, regime)
        ax.set_title(ds + (f", {REGIMES[regime]}" if regime else ""), fontsize=9)
        ax.grid(True, alpha=0.3)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    if labels:
        legend(fig, list(labels.values()), list(labels))
    fig.suptitle(ROW[claim].statement, fontsize=10)
    return save(fig, out / path_of(claim))


def draw_all(records: list[dict], claims: list[dict], out: Path) -> dict[str, Path]:
    """Every figure whose runs are in ``records``; returns {claim (or "intervals", "per_seed",
    "facts"): path}."""
    out = Path(out)
    drawn = {}
    for claim in DRAW:
        path = draw_claim(records, claim, out)
        if path is not None:
            drawn[claim] = path
    path = verdicts.facts(records, out)
    if path is not None:
        drawn["facts"] = path
        for claim in FACT:
            drawn[claim] = path
    family = [c for c in claims if c.get("effect") is not None]
    if family:
        fig, ax = plt.subplots(figsize=(10, 0.32 * len(family) + 1.6), layout="constrained")
        verdicts.intervals(family, ax)
        drawn["intervals"] = save(fig, out / "claims_intervals.png")
    path = verdicts.per_seed(claims, out)
    if path is not None:
        drawn["per_seed"] = path
    return drawn
