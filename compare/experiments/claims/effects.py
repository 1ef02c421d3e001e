"""The claims table: one row per claim of the lesson (:class:`ClaimRow`), each with the
function that turns one seed's runs into that seed's effect, signed so that a positive
value is what the lesson claims; ``judge`` makes the intervals and verdicts.

A row's fields are what a protocol states about a claim: the claim, the metric (in
words, and the function that computes it), the minimum effect, the arms it compares
and the experiment (dataset and regime) it is measured in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from compare.experiments.claims.design import (
    ABLATED_FRACTION,
    GAP_EPOCHS,
    OVERFIT_TEST_LOSS_RISE,
    STABLE_ACCURACY,
)


@dataclasses.dataclass(frozen=True)
class Measured:
    """One seed's effect, whether the regime could show it, and the numbers behind it."""

    effect: float
    regime_ok: bool
    notes: dict[str, float] = dataclasses.field(default_factory=dict)


def unstable(r: dict) -> bool:
    """Diverged, or ended under ``STABLE_ACCURACY``."""
    return r["diverged"] or not r["final_test_acc"] >= STABLE_ACCURACY


def select(records: list[dict], claim: str, **match) -> list[dict]:
    """The records of one experiment whose fields equal ``match`` (a record from before
    variants existed counts as ``variant="standard"``)."""
    return [
        r
        for r in records
        if r["claim"] == claim and all(r.get(k, "standard" if k == "variant" else None) == v for k, v in match.items())
    ]


def generalisation_gap(r: dict) -> float:
    """test loss - train loss (eval mode), averaged over the last ``GAP_EPOCHS`` epochs."""
    c = r["curves"]
    if r["diverged"] or not c["test_loss"]:
        return float("nan")
    return float(np.mean(np.subtract(c["test_loss"], c["train_loss"])[-GAP_EPOCHS:]))


class Runs:
    """One framework's records, found by what they are."""

    def __init__(self, records: list[dict], framework: str):
        self.records = [r for r in records if r["framework"] == framework]
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


def _lr_arm(runs: Runs, seed: int, use_bn: bool, p: float | None) -> list[dict]:
    """The seed's learning-rate sweep of one arm (``p=None``: any Dropout rate > 0)."""
    found = runs.find("learning_rate", seed, use_bn=use_bn, variant="standard")
    found = [r for r in found if (r["dropout"] > 0 if p is None else r["dropout"] == p)]
    return sorted(found, key=lambda r: r["lr"])


def _steps(r: dict) -> float:
    """Steps to the target; a run that never reached it counts as one epoch past its end."""
    if r["steps_to_target"] is not None:
        return float(r["steps_to_target"])
    per_epoch = max(1, (r.get("train_size") or 0) // r["batch_size"])
    return float((r["epochs"] + 1) * per_epoch)


def _max_lr(arm: list[dict]) -> float:
    ok = [r["lr"] for r in arm if not r["diverged"] and r["final_test_acc"] >= r["target_accuracy"]]
    return max(ok) if ok else min(r["lr"] for r in arm) / math.sqrt(10)  # half a decade below the grid


def _probed(runs: Runs, seed: int, key: str, **match) -> list[dict]:
    """The seed's learning-rate runs (lesson's order) whose probes measured ``key``."""
    return [r for r in runs.find("learning_rate", seed, variant="standard", **match) if key in r.get("probes", {})]


# --- one function per claim: (runs, seed) -> Measured -----------------------------------------


def speed(runs: Runs, s: int) -> Measured:
    bn, plain = _lr_arm(runs, s, True, 0.0), _lr_arm(runs, s, False, 0.0)
    a, b = min(map(_steps, bn)), min(map(_steps, plain))
    ok = any(r["steps_to_target"] is not None for r in plain)
    return Measured(1.0 - a / b, ok, {"steps with BN": a, "steps without": b})


def higher_lr(runs: Runs, s: int) -> Measured:
    bn, plain = _lr_arm(runs, s, True, 0.0), _lr_arm(runs, s, False, 0.0)
    a, b = _max_lr(bn), _max_lr(plain)
    ok = unstable(plain[-1]) and b > min(r["lr"] for r in plain)
    return Measured(math.log10(a / b), ok, {"largest lr with BN": a, "largest lr without": b})


def _stability(runs: Runs, s: int, other: list[dict], name: str) -> Measured:
    plain = _lr_arm(runs, s, False, 0.0)
    a, b = np.mean([unstable(r) for r in plain]), np.mean([unstable(r) for r in other])
    ok = any(unstable(r) for r in plain + other)
    return Measured(float(a - b), ok, {f"unstable without {name}": a, f"unstable with {name}": b})


def bn_stability(runs: Runs, s: int) -> Measured:
    return _stability(runs, s, _lr_arm(runs, s, True, 0.0), "BN")


def dropout_stability(runs: Runs, s: int) -> Measured:
    return _stability(runs, s, _lr_arm(runs, s, False, None), "Dropout")


def ics(runs: Runs, s: int) -> Measured:
    (bn,), (plain,) = _probed(runs, s, "ics", use_bn=True), _probed(runs, s, "ics", use_bn=False)
    noisy = runs.one("learning_rate", s, variant="noisy_bn")
    a, b = np.mean(plain["probes"]["ics"]), np.mean(bn["probes"]["ics"])
    ok = len(bn["probes"]["ics"]) >= 3 and len(plain["probes"]["ics"]) >= 3
    notes = {"ICS without BN": a, "ICS with BN": b}
    notes["ICS noisy BN"] = float(np.mean(noisy.get("probes", {}).get("ics", [np.nan])))
    for name, r in (("test acc BN", bn), ("test acc noisy BN", noisy), ("test acc no BN", plain)):
        notes[name] = r["final_test_acc"]
    return Measured(float(a - b), ok, notes)


def _overfitting(runs: Runs, s: int, other: dict) -> Measured:
    ref = runs.one("overfitting", s, use_bn=False, dropout=0.0)
    tl = ref["curves"]["test_loss"]
    ok = ref["final_train_acc"] >= 0.999 and tl[-1] >= OVERFIT_TEST_LOSS_RISE * min(tl)
    notes = {"gap reference": generalisation_gap(ref), "gap": generalisation_gap(other)}
    notes |= {"test acc reference": ref["final_test_acc"], "test acc": other["final_test_acc"]}
    notes["train acc reference"] = ref["final_train_acc"]
    return Measured(generalisation_gap(ref) - generalisation_gap(other), ok, notes)


def bn_overfitting(runs: Runs, s: int) -> Measured:
    return _overfitting(runs, s, runs.one("overfitting", s, use_bn=True, dropout=0.0))


def dropout_overfitting(runs: Runs, s: int) -> Measured:
    return _overfitting(runs, s, next(r for r in runs.find("overfitting", s, use_bn=False) if r["dropout"] > 0))


def reliance(runs: Runs, s: int) -> Measured:
    drops, ok, notes = [], True, {}
    for r in sorted(_probed(runs, s, "ablation_acc", use_bn=False), key=lambda r: r["dropout"]):
        pr = r["probes"]
        drops.append(pr["ablation_full_acc"] - pr["ablation_acc"][str(ABLATED_FRACTION)])
        ok = ok and r["final_train_acc"] >= 0.95
        notes["acc lost with Dropout" if r["dropout"] > 0 else "acc lost without Dropout"] = drops[-1]
    return Measured(drops[0] - drops[1], ok, notes)


def implicit_ensemble(runs: Runs, s: int) -> Measured:
    (r,) = _probed(runs, s, "eval_acc", use_bn=False)
    pr = r["probes"]
    ok = r["dropout"] > 0 and r["final_train_acc"] >= 0.95
    return Measured(pr["eval_acc"] - pr["single_acc"], ok, {k: pr[k] for k in ("eval_acc", "single_acc", "mc_acc",
                                                                                "eval_mc_agreement")})  # fmt: skip


def bn_at_inference(runs: Runs, s: int) -> Measured:
    (r,) = _probed(runs, s, "bn_change", use_bn=True)
    pr = r["probes"]
    ok = pr["bn_affine_residual"] < 1e-4 and pr["bn_batch_dependence"] < 1e-4
    return Measured(
        pr["bn_change"],
        ok,
        {"affine residual": pr["bn_affine_residual"], "batch dependence": pr["bn_batch_dependence"]},
    )


def dropout_at_inference(runs: Runs, s: int) -> Measured:
    (r,) = [r for r in _probed(runs, s, "dropout_change", use_bn=False) if r["dropout"] > 0]
    return Measured(r["probes"]["dropout_change"], r["dropout"] > 0)


def order(runs: Runs, s: int) -> Measured:
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
    compares and the experiment whose runs it is judged from."""

    claim: str
    component: str  # "BatchNorm" | "Dropout" | "both"
    lesson: str  # what the lesson's table says
    statement: str
    metric: str  # what one seed's effect is
    min_effect: float
    arms: tuple[str, str]  # (without, with): the effect compares the first with the second
    experiment: str  # "learning_rate" | "overfitting" | "order"
    effect: Callable[[Runs, int], Measured]
    absence: bool = False  # the lesson says the effect is absent


ROWS = (
    ClaimRow(
        "bn_speeds_up_training", "BatchNorm", "yes", "BatchNorm speeds up training",
        "1 - steps to the target test accuracy (checked after every epoch) with / without BatchNorm, each at its"
        " best learning rate", 0.2, ("plain", "BatchNorm"), "learning_rate", speed,
    ),
    ClaimRow(
        "bn_allows_higher_learning_rates", "BatchNorm", "yes", "BatchNorm allows higher learning rates",
        "log10 of the largest learning rate reaching the target, with / without BatchNorm", 0.45,
        ("plain", "BatchNorm"), "learning_rate", higher_lr,
    ),
    ClaimRow(
        "bn_reduces_internal_covariate_shift", "BatchNorm", "yes", "BatchNorm reduces internal covariate shift",
        "internal covariate shift (Santurkar et al. 2018) at fc2 without - with BatchNorm", 0.05,
        ("plain", "BatchNorm"), "learning_rate", ics,
    ),
    ClaimRow(
        "bn_improves_stability", "BatchNorm", "yes", "BatchNorm improves the stability of training",
        "fraction of learning rates where training is unstable, without - with BatchNorm", 0.15,
        ("plain", "BatchNorm"), "learning_rate", bn_stability,
    ),
    ClaimRow(
        "dropout_improves_stability", "Dropout", "no (a regulariser)", "Dropout does not improve stability",
        "fraction of learning rates where training is unstable, without - with Dropout", 0.15,
        ("plain", "Dropout"), "learning_rate", dropout_stability, absence=True,
    ),
    ClaimRow(
        "bn_reduces_overfitting", "BatchNorm", "a little", "BatchNorm reduces overfitting (a little)",
        "generalisation gap (test - train loss) without - with BatchNorm, in the overfitting regime", 0.05,
        ("plain", "BatchNorm"), "overfitting", bn_overfitting,
    ),
    ClaimRow(
        "dropout_reduces_overfitting", "Dropout", "yes, very useful", "Dropout reduces overfitting",
        "generalisation gap (test - train loss) without - with Dropout, in the overfitting regime", 0.1,
        ("plain", "Dropout"), "overfitting", dropout_overfitting,
    ),
    ClaimRow(
        "dropout_stops_reliance_on_particular_neurons", "Dropout", "yes",
        "Dropout stops the network relying on particular neurons",
        f"test accuracy lost when {ABLATED_FRACTION:.0%} of hidden units are ablated, without - with Dropout", 0.02,
        ("plain", "Dropout"), "learning_rate", reliance,
    ),
    ClaimRow(
        "dropout_behaves_like_an_implicit_ensemble", "Dropout", "yes", "Dropout behaves like an implicit ensemble",
        "test accuracy of the eval-mode network - mean accuracy of one thinned network", 0.01,
        ("one thinned network", "eval mode"), "learning_rate", implicit_ensemble,
    ),
    ClaimRow(
        "bn_active_at_inference", "BatchNorm", "no", "BatchNorm is not active at inference",
        "relative change ||out - in|| / ||in|| that eval-mode BatchNorm makes", 0.01, ("input", "output"),
        "learning_rate", bn_at_inference, absence=True,
    ),
    ClaimRow(
        "dropout_active_at_inference", "Dropout", "no", "Dropout is not active at inference",
        "relative change ||out - in|| / ||in|| that eval-mode Dropout makes", 0.01, ("input", "output"),
        "learning_rate", dropout_at_inference, absence=True,
    ),
    ClaimRow(
        "order_avoids_variance_shift", "both", "BN before the activation, Dropout after it",
        "The lesson's order avoids the train/eval variance shift of Dropout before BatchNorm",
        "variance shift (Li et al. 2019) with Dropout in front of BatchNorm - in the lesson's order", 0.05,
        ("lesson's order", "Dropout before BatchNorm"), "order", order,
    ),
)  # fmt: skip
ROW = {r.claim: r for r in ROWS}
