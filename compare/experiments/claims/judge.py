"""The verdicts on the claims of the classic BatchNorm + Dropout lesson: each claim's
per-seed effects (the claims table, ``effects``) from the runs that ``design`` planned,
whether the regime could show it, and the interval and verdict of ``stats``, per
framework; ``agrees`` says whether torch and linen reached the same verdict.
"""

from __future__ import annotations

import math

import numpy as np

from compare.experiments.claims import stats
from compare.experiments.claims.effects import ROW, ROWS, Runs
from compare.records import Agreement, Claim


def _per_seed(runs: Runs, claim: str) -> tuple[list[float], bool, str]:
    """The per-seed effects of one claim, whether the regime could show it on every seed,
    and the numbers behind it (means over seeds) for the detail."""
    if claim not in ROW:
        raise ValueError(f"unknown claim {claim!r}; known: {', '.join(ROW)}")
    measured = [ROW[claim].effect(runs, s) for s in runs.seeds]
    notes: dict[str, list[float]] = {}
    for m in measured:
        for k, v in m.notes.items():
            notes.setdefault(k, []).append(v)
    detail = "; ".join(f"{k} {np.mean(v):.4g}" for k, v in notes.items())
    return [m.effect for m in measured], all(m.regime_ok for m in measured), detail


PROBED = (
    "bn_reduces_internal_covariate_shift",
    "dropout_stops_reliance_on_particular_neurons",
    "dropout_behaves_like_an_implicit_ensemble",
    "bn_active_at_inference",
    "dropout_active_at_inference",
)  # measured on the learning-rate runs at probe_lr only


def setting(records: list[dict], claim: str) -> str:
    """The data, model and sizes a verdict holds for."""
    rs = [r for r in records if r["claim"] == ROW[claim].experiment]
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
    runs = Runs(records, framework)
    out = []
    for spec in ROWS:
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
