"""The claims table: one row per claim of the lesson (:class:`ClaimRow`), each with the
function that turns one seed's runs into that seed's effect, signed so that a positive
value is what the lesson claims; ``judge`` makes the intervals and verdicts.

A row's fields are what a protocol states about a claim: the claim, the metric (in
words, and the function that computes it), the minimum effect, the arms it compares and
the experiment (and regimes) it is measured in; the datasets are the protocol's. Rows
with ``family=False`` are reported beside the family with the same interval, but do not
count in its correction (the ablation without rescaling, kept for comparison with 0.2).
The two rows of the lesson about inference are not statistical: ``facts``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from compare.experiments.claims.design import (
    ABLATED_FRACTION,
    ARMS,
    GAP_EPOCHS,
    STABLE_ACCURACY,
    largest_lr,
)

REGIMES = {"clean": "clean labels", "noisy": "some labels wrong"}  # the overfitting experiment's


@dataclasses.dataclass(frozen=True)
class Measured:
    """One seed's effect, whether the regime could show it, and the numbers behind it."""

    effect: float
    regime_ok: bool
    notes: dict[str, float] = dataclasses.field(default_factory=dict)
    why: str = ""  # why the effect could not be measured (NaN)


def unstable(r: dict) -> bool:
    """Diverged, or ended under ``STABLE_ACCURACY`` (validation accuracy when there is a
    validation split, else test)."""
    return r["diverged"] or not r.get("final_val_acc", r["final_test_acc"]) >= STABLE_ACCURACY


def select(records: list[dict], claim: str, **match) -> list[dict]:
    """The records of one experiment whose fields equal ``match`` (a record from before
    variants existed counts as ``variant="standard"``)."""
    return [
        r
        for r in records
        if r["claim"] == claim and all(r.get(k, "standard" if k == "variant" else None) == v for k, v in match.items())
    ]


def generalisation_gap(r: dict) -> float:
    """test loss - train loss (eval mode) on the training images whose labels are right
    (all of them with clean labels; 0.2's runs: every training image, wrong labels too),
    averaged over the last ``GAP_EPOCHS`` epochs. The memorised wrong labels are left out:
    on them a network that memorised has a low loss against its labels and a high one
    against the truth, either of which would stand for something other than the gap."""
    c = r["curves"]
    if r["diverged"] or not c["test_loss"]:
        return float("nan")
    train = c.get("train_clean_loss") or c["train_loss"]
    return float(np.mean(np.subtract(c["test_loss"], train)[-GAP_EPOCHS:]))


class Runs:
    """One framework's records on one dataset, found by what they are."""

    def __init__(self, records: list[dict], framework: str, dataset: str | None = None):
        self.records = [
            r for r in records if r["framework"] == framework and (dataset is None or r["dataset"] == dataset)
        ]
        self.seeds = sorted(
            {r["seed"] for r in self.records if r["claim"] in ("learning_rate", "overfitting", "order")}
        )

    def find(self, claim: str, seed: int, **match) -> list[dict]:
        return select(self.records, claim, seed=seed, **match)

    def one(self, claim: str, seed: int, **match) -> dict:
        found = self.find(claim, seed, **match)
        if len(found) != 1:
            raise ValueError(f"expected one {claim} run for seed {seed} with {match}, found {len(found)}")
        return found[0]

    def has(self, experiment: str, seed: int, regime: str | None = None) -> bool:
        found = self.find(experiment, seed)
        if regime is not None:
            found = [r for r in found if _regime(r) == regime]
        return bool(found)


def _regime(r: dict) -> str:
    return "noisy" if r.get("label_noise") else "clean"


def _in_arm(r: dict, arm: str) -> bool:
    use_bn, p = ARMS[arm]
    return r["use_bn"] == use_bn and (r["dropout"] > 0 if p is None else r["dropout"] == p)


def lr_arm(runs: Runs, seed: int, arm: str, criterion: str | None = None) -> list[dict]:
    """The seed's learning-rate grid of one arm (the lesson's order), and with a search
    criterion, that search's runs too; sorted by learning rate."""
    found = [r for r in runs.find("learning_rate", seed, variant="standard") if _in_arm(r, arm)]
    if criterion is not None:
        found += [
            r
            for r in runs.find("lr_search", seed)
            if _in_arm(r, arm) and (r.get("search") or {}).get("criterion") == criterion
        ]
    return sorted(found, key=lambda r: r["lr"])


def steps(r: dict) -> float:
    """Steps to the target test accuracy; a run that never reached it counts as one step
    (one epoch, when checked per epoch) past its end: a floor."""
    if r["steps_to_target"] is not None:
        return float(r["steps_to_target"])
    per_epoch = max(1, (r.get("train_size") or 0) // r["batch_size"])
    return float(r["epochs"] * per_epoch + (1 if r.get("target_check") == "step" else per_epoch))


def chosen(arm: list[dict]) -> dict:
    """The arm's run at its learning rate chosen on validation: fewest steps to the target
    validation accuracy (the smaller lr on a tie); if no lr reaches it, the highest final
    validation accuracy. 0.2's runs have no validation split: fewest test steps."""
    key = "val_steps_to_target" if any("val_steps_to_target" in r for r in arm) else "steps_to_target"
    reached = [r for r in arm if r.get(key) is not None and not r["diverged"]]
    if reached:
        return min(reached, key=lambda r: (r[key], r["lr"]))
    acc = "final_val_acc" if key == "val_steps_to_target" else "final_test_acc"
    return max(arm, key=lambda r: (-1.0 if r["diverged"] else r[acc], -r["lr"]))


def _probed(runs: Runs, seed: int, key: str, **match) -> list[dict]:
    """The seed's learning-rate runs (lesson's order) whose probes measured ``key``."""
    return [r for r in runs.find("learning_rate", seed, variant="standard", **match) if key in r.get("probes", {})]


def _grid_lrs(arm: list[dict]) -> tuple[float, ...]:
    return tuple(sorted({r["lr"] for r in arm if r["claim"] == "learning_rate"}))


# --- one function per claim: (runs, seed, regime) -> Measured ----------------------------------


def speed(runs: Runs, s: int, _regime_name=None) -> Measured:
    bn, plain = chosen(lr_arm(runs, s, "BatchNorm")), chosen(lr_arm(runs, s, "plain"))
    a, b = steps(bn), steps(plain)
    ok = plain["steps_to_target"] is not None
    notes = {"steps with BN": a, "steps without": b, "lr with BN": bn["lr"], "lr without": plain["lr"]}
    return Measured(1.0 - a / b, ok, notes)


def arm_largest_lr(runs: Runs, s: int, arm: str, criterion: str) -> tuple[float, str]:
    found = lr_arm(runs, s, arm, criterion)
    return largest_lr(found, criterion, _grid_lrs(found))


def higher_lr(runs: Runs, s: int, _regime_name=None) -> Measured:
    (a, _), (b, censored) = arm_largest_lr(runs, s, "BatchNorm", "target"), arm_largest_lr(runs, s, "plain", "target")
    return Measured(math.log10(a / b), censored == "", {"largest lr with BN": a, "largest lr without": b})


def _stability(runs: Runs, s: int, arm: str) -> Measured:
    (a, censored), (b, _) = arm_largest_lr(runs, s, "plain", "stable"), arm_largest_lr(runs, s, arm, "stable")
    name = "BN" if arm == "BatchNorm" else arm
    return Measured(math.log10(b / a), censored == "", {"largest stable lr without": a, f"with {name}": b})


def bn_stability(runs: Runs, s: int, _regime_name=None) -> Measured:
    return _stability(runs, s, "BatchNorm")


def dropout_stability(runs: Runs, s: int, _regime_name=None) -> Measured:
    return _stability(runs, s, "Dropout")


def _ics_means(r: dict, key: str = "ics_l2") -> dict[str, float]:
    return {layer: float(np.mean(v)) for layer, v in (r.get("probes") or {}).get(key, {}).items()}


def ics(runs: Runs, s: int, _regime_name=None) -> Measured:
    """Mean over layers of log10(ICS without BN / ICS with BN), each layer's ICS the mean
    of its per-epoch ``||G - G'||``."""
    (bn,), (plain,) = _probed(runs, s, "ics_l2", use_bn=True), _probed(runs, s, "ics_l2", use_bn=False)
    noisy = runs.one("learning_rate", s, variant="noisy_bn")
    a, b = _ics_means(plain), _ics_means(bn)
    ok = min(len(v) for v in (*bn["probes"]["ics_l2"].values(), *plain["probes"]["ics_l2"].values())) >= 3
    effect = float(np.mean([math.log10(a[k] / b[k]) for k in a]))
    notes = {f"ICS {k} without BN": a[k] for k in a} | {f"ICS {k} with BN": b[k] for k in b}
    notes |= {f"ICS {k} noisy BN": v for k, v in _ics_means(noisy).items()}
    notes |= {f"cos {k} with BN": v for k, v in _ics_means(bn, "ics_cos").items()}
    notes |= {f"cos {k} without BN": v for k, v in _ics_means(plain, "ics_cos").items()}
    for name, r in (("test acc BN", bn), ("test acc noisy BN", noisy), ("test acc no BN", plain)):
        notes[name] = r["final_test_acc"]
    return Measured(effect, ok, notes)


def _overfitting(runs: Runs, s: int, regime: str | None, arm: str) -> Measured:
    rs = [r for r in runs.find("overfitting", s) if regime is None or _regime(r) == regime]
    ref = next(r for r in rs if _in_arm(r, "plain"))
    other = next(r for r in rs if _in_arm(r, arm))
    tl = ref["curves"]["test_loss"]
    ok = not ref["diverged"] and ref["final_train_acc"] >= 0.99
    notes = {"gap reference": generalisation_gap(ref), "gap": generalisation_gap(other)}
    notes |= {"test acc reference": ref["final_test_acc"], "test acc": other["final_test_acc"]}
    notes |= {"train acc reference": ref["final_train_acc"], "test loss rise reference": tl[-1] / min(tl)}
    return Measured(generalisation_gap(ref) - generalisation_gap(other), ok, notes)


def bn_overfitting(runs: Runs, s: int, regime: str | None = None) -> Measured:
    return _overfitting(runs, s, regime, "BatchNorm")


def dropout_overfitting(runs: Runs, s: int, regime: str | None = None) -> Measured:
    return _overfitting(runs, s, regime, "Dropout")


def _reliance(runs: Runs, s: int, key: str) -> Measured:
    drops, ok, notes = {}, True, {}
    for r in _probed(runs, s, "ablation_acc", use_bn=False):
        pr = r["probes"]
        lost = pr["ablation_full_acc"] - pr[key][str(ABLATED_FRACTION)]
        drops[r["dropout"] > 0] = lost
        ok = ok and r["final_train_acc"] >= r["target_accuracy"]
        notes["acc lost with Dropout" if r["dropout"] > 0 else "acc lost without Dropout"] = lost
    return Measured(drops[False] - drops[True], ok, notes)


def reliance(runs: Runs, s: int, _regime_name=None) -> Measured:
    """With the kept units rescaled by 1 / (1 - f), as Dropout does in training."""
    return _reliance(runs, s, "ablation_acc_rescaled")


def reliance_unscaled(runs: Runs, s: int, _regime_name=None) -> Measured:
    """0.2's measure: the units zeroed, the rest left as they are."""
    return _reliance(runs, s, "ablation_acc")


def implicit_ensemble(runs: Runs, s: int, _regime_name=None) -> Measured:
    (r,) = _probed(runs, s, "eval_acc", use_bn=False)
    pr = r["probes"]
    ok = r["dropout"] > 0 and r["final_train_acc"] >= r["target_accuracy"]
    notes = {k: pr[k] for k in ("eval_acc", "single_acc", "mc_acc", "eval_mc_agreement")}
    return Measured(pr["eval_acc"] - pr["single_acc"], ok, notes)


def order(runs: Runs, s: int, _regime_name=None) -> Measured:
    by = {v: runs.one("order", s, variant=v) for v in ("standard", "dropout_before_bn", "dropout_last_only")}
    shift = {v: r["probes"]["variance_shift"] if "probes" in r else float("nan") for v, r in by.items()}
    ok = all(not r["diverged"] for r in by.values()) and by["standard"]["dropout"] > 0
    notes = {}
    for v, r in by.items():
        notes[f"shift {v}"], notes[f"test acc {v}"] = shift[v], r["final_test_acc"]
    return Measured(shift["dropout_before_bn"] - shift["standard"], ok, notes)


# --- the table ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClaimRow:
    """One row of the lesson's table: what it says, how one seed's effect is measured
    (``metric`` in words, ``effect`` the function), the effect it needs, the arms it
    compares and the experiment (with its regimes) whose runs it is judged from."""

    claim: str
    component: str  # "BatchNorm" | "Dropout" | "both"
    lesson: str  # what the lesson's table says
    statement: str
    metric: str  # what one seed's effect is
    min_effect: float
    arms: tuple[str, str]  # (reference, compared): the effect compares the first with the second
    experiment: str  # "learning_rate" | "overfitting" | "order"
    effect: Callable[..., Measured]
    absence: bool = False  # the lesson says the effect is absent
    regimes: tuple[str | None, ...] = (None,)  # the overfitting experiment's "clean" and "noisy"
    family: bool = True  # counted in the family of confirmatory claims (Bonferroni's k)
    name: str = ""  # the row's name when it is a second measure of a claim


ROWS = (
    ClaimRow(
        "bn_speeds_up_training", "BatchNorm", "yes", "BatchNorm speeds up training",
        "1 - steps (counted per step) to the target test accuracy with / without BatchNorm, each arm at its learning"
        " rate chosen on the validation split", 0.2, ("plain", "BatchNorm"), "learning_rate", speed,
    ),
    ClaimRow(
        "bn_allows_higher_learning_rates", "BatchNorm", "yes", "BatchNorm allows higher learning rates",
        "log10 of the largest learning rate reaching the target validation accuracy (bisection on log lr), with /"
        " without BatchNorm", 0.3, ("plain", "BatchNorm"), "learning_rate", higher_lr,
    ),
    ClaimRow(
        "bn_reduces_internal_covariate_shift", "BatchNorm", "yes", "BatchNorm reduces internal covariate shift",
        "log10 of the internal covariate shift (Santurkar et al. 2018, def. 2.1: ||G - G'|| when the layers before"
        " take the optimizer's own step) without / with BatchNorm, mean over the layers fc2..head and the epochs",
        0.1, ("plain", "BatchNorm"), "learning_rate", ics,
    ),
    ClaimRow(
        "bn_improves_stability", "BatchNorm", "yes", "BatchNorm improves the stability of training",
        "log10 of the largest learning rate at which training stays stable (no divergence, validation accuracy >="
        f" {STABLE_ACCURACY:.0%}; bisection on log lr), with / without BatchNorm", 0.3, ("plain", "BatchNorm"),
        "learning_rate", bn_stability,
    ),
    ClaimRow(
        "dropout_improves_stability", "Dropout", "no (a regulariser)", "Dropout does not improve stability",
        "log10 of the largest learning rate at which training stays stable, with / without Dropout", 0.3,
        ("plain", "Dropout"), "learning_rate", dropout_stability, absence=True,
    ),
    ClaimRow(
        "bn_reduces_overfitting", "BatchNorm", "a little", "BatchNorm reduces overfitting (a little)",
        "generalisation gap (test loss - train loss on the training images whose labels are right) without - with"
        " BatchNorm, on a 300-image subset trained to fit it", 0.05, ("plain", "BatchNorm"), "overfitting", bn_overfitting,
        regimes=("clean", "noisy"),
    ),
    ClaimRow(
        "dropout_reduces_overfitting", "Dropout", "yes, very useful", "Dropout reduces overfitting",
        "generalisation gap (test loss - train loss on the training images whose labels are right) without - with"
        " Dropout, on a 300-image subset trained to fit it", 0.1, ("plain", "Dropout"), "overfitting", dropout_overfitting,
        regimes=("clean", "noisy"),
    ),
    ClaimRow(
        "dropout_stops_reliance_on_particular_neurons", "Dropout", "yes",
        "Dropout stops the network relying on particular neurons",
        f"test accuracy lost when {ABLATED_FRACTION:.0%} of hidden units are ablated and the rest rescaled by"
        " 1/(1-f), without - with Dropout", 0.02, ("plain", "Dropout"), "learning_rate", reliance,
    ),
    ClaimRow(
        "dropout_stops_reliance_on_particular_neurons", "Dropout", "yes",
        "Dropout stops the network relying on particular neurons (ablation without rescaling, as 0.2)",
        f"test accuracy lost when {ABLATED_FRACTION:.0%} of hidden units are zeroed (no rescaling), without - with"
        " Dropout", 0.02, ("plain", "Dropout"), "learning_rate", reliance_unscaled, family=False, name="unscaled",
    ),
    ClaimRow(
        "dropout_behaves_like_an_implicit_ensemble", "Dropout", "yes", "Dropout behaves like an implicit ensemble",
        "test accuracy of the eval-mode network - mean accuracy of one thinned network", 0.01,
        ("one thinned network", "eval mode"), "learning_rate", implicit_ensemble,
    ),
    ClaimRow(
        "order_avoids_variance_shift", "both", "BN before the activation, Dropout after it",
        "The lesson's order avoids the train/eval variance shift of Dropout before BatchNorm",
        "variance shift (Li et al. 2019) with Dropout in front of BatchNorm - in the lesson's order", 0.05,
        ("lesson's order", "Dropout before BatchNorm"), "order", order,
    ),
)  # fmt: skip
ROW = {r.claim: r for r in ROWS if r.family}


def measure(row: ClaimRow, runs: Runs, seed: int, regime: str | None) -> Measured:
    """One seed's effect; a run the effect needs that could not be measured (a diverged
    probe run, a missing record) gives NaN, which the judge's stated rule handles."""
    try:
        m = row.effect(runs, seed, regime)
    except (KeyError, ValueError, StopIteration, ZeroDivisionError, TypeError) as e:
        return Measured(float("nan"), False, {}, f"{type(e).__name__}: {e}"[:120])
    return m if math.isfinite(m.effect) else Measured(float("nan"), m.regime_ok, m.notes, "not finite")
