"""The verdicts on the claims of the classic BatchNorm + Dropout lesson: each claim's
per-seed effects from the runs that ``compare.experiments.design`` planned, whether the
regime could show it, and the interval and verdict of ``compare.experiments.stats``, per
framework; ``agrees`` says whether torch and linen reached the same verdict.
"""

from __future__ import annotations

import math

import numpy as np

from compare.experiments import stats
from compare.experiments.design import (  # noqa: F401  (PLANS and Plan: re-exported)
    ABLATED_FRACTION,
    GAP_EPOCHS,
    OVERFIT_TEST_LOSS_RISE,
    PLANS,
    SPEC,
    SPECS,
    STABLE_ACCURACY,
    Plan,
)
from compare.records import Agreement, Claim


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


class _Runs:
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


def _lr_arm(runs: _Runs, seed: int, use_bn: bool, p: float) -> list[dict]:
    return sorted(runs.find("learning_rate", seed, use_bn=use_bn, dropout=p, variant="standard"), key=lambda r: r["lr"])


def _steps(r: dict) -> float:
    """Steps to the target; a run that never reached it counts as one epoch past its end."""
    if r["steps_to_target"] is not None:
        return float(r["steps_to_target"])
    per_epoch = max(1, (r.get("train_size") or 0) // r["batch_size"])
    return float((r["epochs"] + 1) * per_epoch)


def _max_lr(arm: list[dict]) -> float:
    ok = [r["lr"] for r in arm if not r["diverged"] and r["final_test_acc"] >= r["target_accuracy"]]
    return max(ok) if ok else min(r["lr"] for r in arm) / math.sqrt(10)  # half a decade below the grid


def _probed(runs: _Runs, seed: int, key: str, **match) -> list[dict]:
    """The seed's learning-rate runs (lesson's order) whose probes measured ``key``."""
    return [r for r in runs.find("learning_rate", seed, variant="standard", **match) if key in r.get("probes", {})]


def _per_seed(runs: _Runs, claim: str) -> tuple[list[float], bool, str]:
    """The per-seed effects of one claim, whether the regime could show it, and the numbers
    behind it (means over seeds) for the detail."""
    effects, regime, notes = [], [], {}

    def note(key, value):
        notes.setdefault(key, []).append(value)

    for s in runs.seeds:
        if claim in ("bn_speeds_up_training", "bn_allows_higher_learning_rates", "bn_improves_stability"):
            bn, plain = _lr_arm(runs, s, True, 0.0), _lr_arm(runs, s, False, 0.0)
            if claim == "bn_speeds_up_training":
                a, b = min(map(_steps, bn)), min(map(_steps, plain))
                effects.append(1.0 - a / b)
                regime.append(any(r["steps_to_target"] is not None for r in plain))
                note("steps with BN", a), note("steps without", b)
            elif claim == "bn_allows_higher_learning_rates":
                a, b = _max_lr(bn), _max_lr(plain)
                effects.append(math.log10(a / b))
                regime.append(unstable(plain[-1]) and b > min(r["lr"] for r in plain))
                note("largest lr with BN", a), note("largest lr without", b)
            else:
                a, b = np.mean([unstable(r) for r in plain]), np.mean([unstable(r) for r in bn])
                effects.append(float(a - b))
                regime.append(any(unstable(r) for r in plain + bn))
                note("unstable without BN", a), note("unstable with BN", b)
        elif claim == "dropout_improves_stability":
            plain = _lr_arm(runs, s, False, 0.0)
            drop = [r for r in runs.find("learning_rate", s, use_bn=False, variant="standard") if r["dropout"] > 0]
            a, b = np.mean([unstable(r) for r in plain]), np.mean([unstable(r) for r in drop])
            effects.append(float(a - b))
            regime.append(any(unstable(r) for r in plain + drop))
            note("unstable without Dropout", a), note("unstable with Dropout", b)
        elif claim == "bn_reduces_internal_covariate_shift":
            (bn,), (plain,) = _probed(runs, s, "ics", use_bn=True), _probed(runs, s, "ics", use_bn=False)
            noisy = runs.one("learning_rate", s, variant="noisy_bn")
            a, b = np.mean(plain["probes"]["ics"]), np.mean(bn["probes"]["ics"])
            effects.append(float(a - b))
            regime.append(len(bn["probes"]["ics"]) >= 3 and len(plain["probes"]["ics"]) >= 3)
            note("ICS without BN", a), note("ICS with BN", b)
            note("ICS noisy BN", float(np.mean(noisy.get("probes", {}).get("ics", [np.nan]))))
            for name, r in (("test acc BN", bn), ("test acc noisy BN", noisy), ("test acc no BN", plain)):
                note(name, r["final_test_acc"])
        elif claim in ("bn_reduces_overfitting", "dropout_reduces_overfitting"):
            ref = runs.one("overfitting", s, use_bn=False, dropout=0.0)
            if claim == "bn_reduces_overfitting":
                other = runs.one("overfitting", s, use_bn=True, dropout=0.0)
            else:
                other = next(r for r in runs.find("overfitting", s, use_bn=False) if r["dropout"] > 0)
            effects.append(generalisation_gap(ref) - generalisation_gap(other))
            tl = ref["curves"]["test_loss"]
            regime.append(ref["final_train_acc"] >= 0.999 and tl[-1] >= OVERFIT_TEST_LOSS_RISE * min(tl))
            note("gap reference", generalisation_gap(ref)), note("gap", generalisation_gap(other))
            note("test acc reference", ref["final_test_acc"]), note("test acc", other["final_test_acc"])
            note("train acc reference", ref["final_train_acc"])
        elif claim == "dropout_stops_reliance_on_particular_neurons":
            drops = []
            for r in sorted(_probed(runs, s, "ablation_acc", use_bn=False), key=lambda r: r["dropout"]):
                pr = r["probes"]
                drops.append(pr["ablation_full_acc"] - pr["ablation_acc"][str(ABLATED_FRACTION)])
                regime.append(r["final_train_acc"] >= 0.95)
                note("acc lost with Dropout" if r["dropout"] > 0 else "acc lost without Dropout", drops[-1])
            effects.append(drops[0] - drops[1])
        elif claim == "dropout_behaves_like_an_implicit_ensemble":
            (r,) = _probed(runs, s, "eval_acc", use_bn=False)
            pr = r["probes"]
            effects.append(pr["eval_acc"] - pr["single_acc"])
            regime.append(r["dropout"] > 0 and r["final_train_acc"] >= 0.95)
            for k in ("eval_acc", "single_acc", "mc_acc", "eval_mc_agreement"):
                note(k, pr[k])
        elif claim in ("bn_active_at_inference", "dropout_active_at_inference"):
            use_bn = claim == "bn_active_at_inference"
            key = "bn_change" if use_bn else "dropout_change"
            (r,) = [r for r in _probed(runs, s, key, use_bn=use_bn) if use_bn or r["dropout"] > 0]
            pr = r["probes"]
            effects.append(pr[key])
            if use_bn:
                regime.append(pr["bn_affine_residual"] < 1e-4 and pr["bn_batch_dependence"] < 1e-4)
                note("affine residual", pr["bn_affine_residual"]), note("batch dependence", pr["bn_batch_dependence"])
            else:
                regime.append(r["dropout"] > 0)
        elif claim == "order_avoids_variance_shift":
            by = {v: runs.one("order", s, variant=v) for v in ("standard", "dropout_before_bn", "dropout_last_only")}
            shift = {v: r["probes"]["variance_shift"] if "probes" in r else float("nan") for v, r in by.items()}
            effects.append(shift["dropout_before_bn"] - shift["standard"])
            regime.append(all(not r["diverged"] for r in by.values()) and by["standard"]["dropout"] > 0)
            for v, r in by.items():
                note(f"shift {v}", shift[v]), note(f"test acc {v}", r["final_test_acc"])
        else:
            raise ValueError(f"unknown claim {claim!r}; known: {', '.join(SPEC)}")
    detail = "; ".join(f"{k} {np.mean(v):.4g}" for k, v in notes.items())
    return effects, all(regime), detail


PROBED = (
    "bn_reduces_internal_covariate_shift",
    "dropout_stops_reliance_on_particular_neurons",
    "dropout_behaves_like_an_implicit_ensemble",
    "bn_active_at_inference",
    "dropout_active_at_inference",
)  # measured on the learning-rate runs at probe_lr only


def setting(records: list[dict], claim: str) -> str:
    """The data, model and sizes a verdict holds for."""
    rs = [r for r in records if r["claim"] == SPEC[claim].experiment]
    if claim in PROBED:
        rs = [r for r in rs if "probes" in r]
    if not rs:
        return "-"
    r = rs[0]
    hidden = "-".join(map(str, r.get("hidden") or []))
    what = f"{r['dataset']}, {r.get('train_size', '?')} training images"
    if r.get("label_noise"):
        what += f" ({r['label_noise']:.0%} labels wrong)"
    lrs = sorted({x["lr"] for x in rs})
    lr = f"lr {lrs[0]}" + (f"-{lrs[-1]}" if len(lrs) > 1 else "")
    return f"{what}; mlp {hidden}; SGD momentum 0.9, {lr}, batch {r['batch_size']}, {r['epochs']} epochs"


def judge(records: list[dict], framework: str) -> list[dict]:
    """One Claim per row of the lesson's table, for one framework's runs."""
    runs = _Runs(records, framework)
    out = []
    for spec in SPECS:
        if not any(r["claim"] == spec.experiment for r in runs.records):
            continue  # its experiment did not run
        effects, regime_ok, detail = _per_seed(runs, spec.claim)
        if any(not math.isfinite(e) for e in effects) or len(effects) < 2:
            ci, verdict = None, "inconclusive"
            detail = f"not measurable on every seed (per-seed effects {effects}); " + detail
        else:
            ci = stats.interval(effects)
            verdict = stats.verdict(ci, spec.min_effect, absence=spec.absence) if regime_ok else "inconclusive"
        out.append(
            Claim(
                claim=spec.claim,
                model="mlp",
                framework=framework,
                verdict=verdict,
                holds=verdict == "holds",
                component=spec.component,
                lesson=spec.lesson,
                statement=spec.statement,
                metric=spec.metric,
                min_effect=spec.min_effect,
                effect=None if ci is None else ci.effect,
                ci_low=None if ci is None else ci.low,
                ci_high=None if ci is None else ci.high,
                seeds=len(effects),
                per_seed=[float(e) for e in effects],
                regime_ok=bool(regime_ok),
                setting=setting(runs.records, spec.claim),
                detail=detail,
            ).to_dict()
        )
    return out


def claims(records: list[dict]) -> list[dict]:
    """Every claim in every framework that ran, and whether the frameworks agree."""
    out = [c for fw in ("torch", "linen") if any(r["framework"] == fw for r in records) for c in judge(records, fw)]
    verdicts: dict[str, set] = {}
    for c in out:
        verdicts.setdefault(c["claim"], set()).add(c["verdict"])
    return [{**c, "agrees": len(verdicts[c["claim"]]) == 1} for c in out]


def framework_agreement(records: list[dict]) -> list[dict]:
    """Per run: the final test accuracy of each framework and their difference."""
    runs: dict[tuple, dict] = {}
    for r in records:
        key = (r["claim"], r["model"], r["use_bn"], r["dropout"], r["lr"], r["seed"], r.get("variant", "standard"))
        runs.setdefault(key, {})[r["framework"]] = r
    rows = []
    for (claim, model, use_bn, dropout, lr, seed, variant), by_fw in runs.items():
        if {"torch", "linen"} <= set(by_fw):
            a, b = by_fw["torch"]["final_test_acc"], by_fw["linen"]["final_test_acc"]
            rows.append(
                Agreement(
                    claim=claim,
                    model=model,
                    use_bn=use_bn,
                    dropout=dropout,
                    lr=lr,
                    seed=seed,
                    variant=variant,
                    torch_test_acc=a,
                    linen_test_acc=b,
                    acc_diff=abs(a - b) if math.isfinite(a) and math.isfinite(b) else None,
                    both_diverged=by_fw["torch"]["diverged"] and by_fw["linen"]["diverged"],
                ).to_dict()
            )
    return rows
