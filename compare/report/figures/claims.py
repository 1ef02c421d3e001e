"""One figure per claim of the lesson (``claim_<claim>.png``) and one of every verdict's
interval (``claims_intervals.png``), from the ``train`` suite's records. Torch is drawn
solid, linen dashed; a line is the mean over seeds, a band the range of the seeds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from compare.experiments.claims import ABLATED_FRACTION, ROW, STABLE_ACCURACY, select, unstable
from compare.report.figures.style import plt, save

STYLE = {"torch": "-", "linen": "--"}


def _frameworks(records: list[dict]) -> list[str]:
    return [fw for fw in ("torch", "linen") if any(r["framework"] == fw for r in records)]


def _band(ax, x, rows: list[list[float]], label: str, style: str, colour):
    """Mean over seeds with the seeds' range; rows of unequal length (diverged runs) are cut
    to the shortest."""
    n = min(len(r) for r in rows)
    if n == 0:
        return
    a = np.array([r[:n] for r in rows], dtype=float)
    ax.plot(x[:n], a.mean(0), style, color=colour, label=label)
    ax.fill_between(x[:n], a.min(0), a.max(0), color=colour, alpha=0.12)


LR_ARMS = (  # the learning-rate experiment's arms: name, fields, colour (Dropout: any rate > 0)
    ("BatchNorm", dict(use_bn=True, dropout=0.0), "tab:blue"),
    ("plain", dict(use_bn=False, dropout=0.0), "tab:grey"),
    ("Dropout", dict(use_bn=False), "tab:orange"),
)


def _arm(records, claim, fw, match):
    rs = select(records, claim, framework=fw, variant="standard", **match)
    return [r for r in rs if "dropout" in match or r["dropout"] > 0]


def speed(records: list[dict], ax) -> None:
    for fw in _frameworks(records):
        for name, match, colour in LR_ARMS[:2]:
            rs = _arm(records, "learning_rate", fw, match)
            lrs = sorted({r["lr"] for r in rs})
            steps = [np.mean([r["steps_to_target"] or np.nan for r in rs if r["lr"] == lr]) for lr in lrs]
            ax.plot(lrs, steps, STYLE[fw], marker="o", color=colour, label=f"{name} ({fw})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("steps to the target test accuracy\n(mean over seeds; no point: never reached)")


def higher_lr(records: list[dict], ax) -> None:
    for fw in _frameworks(records):
        for name, match, colour in LR_ARMS:
            rs = _arm(records, "learning_rate", fw, match)
            lrs = sorted({r["lr"] for r in rs})
            acc = [[0.0 if r["diverged"] else r["final_test_acc"] for r in rs if r["lr"] == lr] for lr in lrs]
            ax.plot(lrs, [np.mean(a) for a in acc], STYLE[fw], marker="o", color=colour, label=f"{name} ({fw})")
            ax.fill_between(lrs, [min(a) for a in acc], [max(a) for a in acc], color=colour, alpha=0.1)
    target = next((r["target_accuracy"] for r in records if r["claim"] == "learning_rate"), None)
    if target:
        ax.axhline(target, color="k", lw=0.8, ls=":", label="target")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final test accuracy (diverged: 0)")


def stability(arms: tuple[str, ...]) -> Callable:
    def draw(records: list[dict], ax) -> None:
        for fw in _frameworks(records):
            for name, match, colour in LR_ARMS:
                if name not in arms:
                    continue
                rs = _arm(records, "learning_rate", fw, match)
                lrs = sorted({r["lr"] for r in rs})
                frac = [np.mean([unstable(r) for r in rs if r["lr"] == lr]) for lr in lrs]
                ax.plot(lrs, frac, STYLE[fw], marker="o", color=colour, label=f"{name} ({fw})")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(f"fraction of seeds unstable (diverged or < {STABLE_ACCURACY:.0%})")

    return draw


def ics(records: list[dict], ax) -> None:
    arms = [
        ("BatchNorm", dict(use_bn=True, variant="standard"), "tab:blue"),
        ("plain", dict(use_bn=False, variant="standard"), "tab:grey"),
        ("noisy BatchNorm", dict(use_bn=True, variant="noisy_bn"), "tab:red"),
    ]
    for fw in _frameworks(records):
        for name, match, colour in arms:
            rows = [
                r["probes"]["ics"]
                for r in select(records, "learning_rate", framework=fw, **match)
                if "ics" in r.get("probes", {})
            ]
            if rows:
                _band(ax, np.arange(1, 1 + max(map(len, rows))), rows, f"{name} ({fw})", STYLE[fw], colour)
    ax.set_xlabel("epoch")
    ax.set_ylabel("internal covariate shift at fc2: ||G - G'|| / ||G||")


def overfitting(other: dict, name: str) -> Callable:
    def draw(records: list[dict], ax) -> None:
        for fw in _frameworks(records):
            for label, match, colour in (("no BN, no Dropout", dict(use_bn=False, dropout=0.0), "tab:grey"),
                                         (name, other, "tab:green")):  # fmt: skip
                rs = [
                    r
                    for r in select(records, "overfitting", framework=fw, **match)
                    if "dropout" in match or r["dropout"] > 0
                ]
                if not rs:
                    continue
                x = np.arange(1, 1 + max(len(r["curves"]["test_loss"]) for r in rs))
                _band(ax, x, [r["curves"]["test_loss"] for r in rs], f"{label}: test ({fw})", STYLE[fw], colour)
                _band(ax, x, [r["curves"]["train_loss"] for r in rs], f"{label}: train ({fw})", ":", colour)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss (eval mode); noisy training labels")
        ax.set_yscale("log")

    return draw


def reliance(records: list[dict], ax) -> None:
    for fw in _frameworks(records):
        for p, colour in ((False, "tab:grey"), (True, "tab:orange")):
            rs = [
                r
                for r in select(records, "learning_rate", framework=fw, use_bn=False, variant="standard")
                if "ablation_acc" in r.get("probes", {}) and (r["dropout"] > 0) == p
            ]
            if not rs:
                continue
            fracs = [0.0, *sorted(float(f) for f in rs[0]["probes"]["ablation_acc"])]
            rows = [
                [r["probes"]["ablation_full_acc"], *(r["probes"]["ablation_acc"][str(f)] for f in fracs[1:])]
                for r in rs
            ]
            _band(ax, np.array(fracs), rows, f"{'with' if p else 'without'} Dropout ({fw})", STYLE[fw], colour)
    ax.axvline(ABLATED_FRACTION, color="k", lw=0.8, ls=":")
    ax.set_xlabel("fraction of hidden units ablated at test time (no rescaling)")
    ax.set_ylabel("test accuracy")


def ensemble(records: list[dict], ax) -> None:
    for fw in _frameworks(records):
        rs = [r for r in select(records, "learning_rate", framework=fw) if "mc_acc_by_members" in r.get("probes", {})]
        if not rs:
            continue
        ks = sorted(int(k) for k in rs[0]["probes"]["mc_acc_by_members"])
        rows = [[r["probes"]["mc_acc_by_members"][str(k)] for k in ks] for r in rs]
        _band(ax, np.array(ks), rows, f"Monte-Carlo ensemble ({fw})", STYLE[fw], "tab:orange")
        ax.axhline(
            np.mean([r["probes"]["eval_acc"] for r in rs]),
            color="tab:blue",
            ls=STYLE[fw],
            label=f"eval mode, weight scaling ({fw})",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("thinned networks averaged (1: a single one)")
    ax.set_ylabel("test accuracy")


def active(key: str, prefix: str) -> Callable:
    def draw(records: list[dict], ax) -> None:
        width = 0.38
        for j, fw in enumerate(_frameworks(records)):
            per = [
                r["probes"][f"{key}_per_layer"]
                for r in select(records, "learning_rate", framework=fw)
                if f"{key}_per_layer" in r.get("probes", {}) and (prefix == "bn" or r["dropout"] > 0)
            ]
            if not per:
                continue
            layers = sorted(per[0])
            means = [np.mean([p[name] for p in per]) for name in layers]
            bars = ax.bar(np.arange(len(layers)) + j * width, means, width, label=fw)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)  # Dropout's bars are exactly 0: the label says so
            ax.set_xticks(np.arange(len(layers)) + width / 2, layers)
        ax.set_ylabel("||eval-mode output - input|| / ||input|| (test set)")

    return draw


def order(records: list[dict], ax) -> None:
    variants = ("standard", "dropout_before_bn", "dropout_last_only")
    width = 0.4
    for j, fw in enumerate(_frameworks(records)):
        rs = select(records, "order", framework=fw)
        layers = sorted({k for r in rs for k in r.get("probes", {}).get("variance_ratio", {})})
        for i, v in enumerate(variants):
            ratios = [r["probes"]["variance_ratio"] for r in rs if r.get("variant") == v and "probes" in r]
            if ratios:
                for k, name in enumerate(layers):
                    ax.bar(
                        i * (len(layers) + 1) + k + j * width,
                        np.mean([x[name] for x in ratios]),
                        width,
                        color=f"C{k}",
                        alpha=1.0 if fw == "torch" else 0.5,
                        label=f"{name} ({fw})" if i == 0 else None,
                    )
        ax.set_xticks([i * (len(layers) + 1) + (len(layers) - 1) / 2 for i in range(len(variants))], variants)
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    ax.set_ylabel("running variance / eval-mode variance of BN's input")


def intervals(claims: list[dict], ax) -> None:
    """Every claim's effect over its minimum effect, with the interval: 1 is the claim's
    threshold, 0 no effect."""
    rows = [c for c in claims if c.get("effect") is not None]
    names = list(dict.fromkeys(c["claim"] for c in rows))
    for c in rows:
        y = names.index(c["claim"]) + (0.15 if c["framework"] == "linen" else -0.15)
        m = c["min_effect"]
        ax.errorbar(
            c["effect"] / m,
            y,
            xerr=[[(c["effect"] - c["ci_low"]) / m], [(c["ci_high"] - c["effect"]) / m]],
            fmt="o" if c["framework"] == "torch" else "s",
            color="C0" if c["framework"] == "torch" else "C1",
            capsize=3,
            label=c["framework"],
        )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(list(unique.values()), list(unique), fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.axvline(0, color="k", lw=0.8)
    ax.axvline(1, color="tab:green", lw=0.8, ls="--")
    ax.axvline(-1, color="tab:red", lw=0.8, ls=":")
    ax.set_xscale("symlog")
    ax.set_xlabel("effect / minimum effect, 95% interval over seeds (1: the threshold)")


DRAW: dict[str, Callable] = {
    "bn_speeds_up_training": speed,
    "bn_allows_higher_learning_rates": higher_lr,
    "bn_reduces_internal_covariate_shift": ics,
    "bn_improves_stability": stability(("BatchNorm", "plain")),
    "dropout_improves_stability": stability(("Dropout", "plain")),
    "bn_reduces_overfitting": overfitting(dict(use_bn=True, dropout=0.0), "BatchNorm"),
    "dropout_reduces_overfitting": overfitting(dict(use_bn=False), "Dropout"),
    "dropout_stops_reliance_on_particular_neurons": reliance,
    "dropout_behaves_like_an_implicit_ensemble": ensemble,
    "bn_active_at_inference": active("bn_change", "bn"),
    "dropout_active_at_inference": active("dropout_change", "drop"),
    "order_avoids_variance_shift": order,
}


def path_of(claim: str) -> str:
    return f"claim_{claim}.png"


def draw_all(records: list[dict], claims: list[dict], out: Path) -> dict[str, Path]:
    """Every figure whose runs are in ``records``; returns {claim (or "intervals"): path}."""
    drawn = {}
    for claim, draw in DRAW.items():
        if not any(r["claim"] == ROW[claim].experiment for r in records):
            continue  # its experiment did not run
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(records, ax)
        ax.set_title(ROW[claim].statement, fontsize=9)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0] and ax.get_legend() is None:
            ax.legend(fontsize=6)
        drawn[claim] = save(fig, out / path_of(claim))
    if claims:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len({c["claim"] for c in claims}) + 1.5))
        intervals(claims, ax)
        drawn["intervals"] = save(fig, out / "claims_intervals.png")
    return drawn
