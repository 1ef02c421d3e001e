"""The verdicts on the claims of the classic BatchNorm + Dropout lesson, from a run's
records: per claim of the table (``effects``), dataset and regime, the per-seed effects,
whether the regime could show the effect, and the interval and verdict of ``stats``.

:func:`summary` is the analysis a protocol states: the frameworks pooled with framework
as a block (torch and linen on disjoint seeds), one interval per row of the family at
``1 - alpha / k`` (Bonferroni, ``k`` rows), the rows outside the family beside them at the
same level, the implementation check on the shared seeds (both frameworks, reported
apart), and the facts of eval mode. :func:`claims` is 0.2's analysis, one 95% verdict
per framework, kept for runs that put both frameworks on the same seeds.

A seed whose effect cannot be measured (a probe run that diverged) is left out and listed
with the reason; a row that loses more than ``max_excluded`` of its seeds is
inconclusive.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from compare.experiments.claims import stats
from compare.experiments.claims.effects import ROWS, ClaimRow, Runs, measure
from compare.experiments.claims.facts import FACT, fact_check
from compare.records import Agreement, Claim, Fact, ImplementationCheck

PROBED = (
    "bn_reduces_internal_covariate_shift",
    "dropout_stops_reliance_on_particular_neurons",
    "dropout_behaves_like_an_implicit_ensemble",
)  # measured on the learning-rate runs at probe_lr only


@dataclasses.dataclass(frozen=True)
class Analysis:
    """How a run's records are judged (a protocol fills it; the built-in plans too)."""

    blocks: dict[str, tuple[int, ...]]  # framework -> its seeds, pooled
    shared: tuple[int, ...] = ()  # seeds run in both frameworks: the implementation check
    by_dataset: dict[str, tuple[dict[str, tuple[int, ...]], tuple[int, ...]]] | None = None  # (blocks, shared)
    alpha: float = stats.FAMILY_ALPHA
    min_effects: dict[str, float] | None = None  # row key -> minimum effect, where it differs from the table
    max_excluded: float = 0.1  # the fraction of a row's seeds that may be left out before it is inconclusive
    kind: str = "exploratory"  # "exploratory" | "pilot" | "confirmatory"
    k: int | None = None  # the family's size as registered (None: the family rows the records can judge)

    def seeds(self, dataset: str) -> tuple[dict[str, tuple[int, ...]], tuple[int, ...]]:
        """The blocks and the shared seeds of one dataset."""
        return (self.by_dataset or {}).get(dataset, (self.blocks, self.shared))


def row_key(row: ClaimRow) -> str:
    return row.claim + (f":{row.name}" if row.name else "")


def family(records: list[dict]) -> list[tuple[ClaimRow, str, str | None]]:
    """Every (row, dataset, regime) the records can judge, the family's rows first."""
    out = []
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    for row in sorted(ROWS, key=lambda r: not r.family):
        for ds in datasets:
            for regime in row.regimes:
                rs = [r for r in records if r["dataset"] == ds and r["claim"] == row.experiment]
                if regime is not None:
                    rs = [r for r in rs if bool(r.get("label_noise")) == (regime == "noisy")]
                if rs:
                    out.append((row, ds, regime))
    return out


def setting(records: list[dict], row: ClaimRow, dataset: str | None = None, regime: str | None = None) -> str:
    """The data, model and sizes a verdict holds for."""
    rs = [r for r in records if r["claim"] == row.experiment and dataset in (None, r["dataset"])]
    if regime is not None:
        rs = [r for r in rs if bool(r.get("label_noise")) == (regime == "noisy")]
    if row.claim in PROBED:
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


def _detail(measured: list) -> str:
    notes: dict[str, list[float]] = {}
    for m in measured:
        for k, v in m.notes.items():
            notes.setdefault(k, []).append(v)
    return "; ".join(f"{k} {np.mean(v):.4g}" for k, v in notes.items())


def _effects(records, row, dataset, regime, seeds_of: dict[str, tuple[int, ...]]):
    """Per framework, the measured seeds: [(seed, Measured)]."""
    out = {}
    for fw, seeds in seeds_of.items():
        runs = Runs(records, fw, dataset)
        out[fw] = [
            (s, measure(row, runs, s, regime)) for s in seeds if runs.has(row.experiment, s, regime)
        ]  # fmt: skip
    return out


def _claim(records, row, dataset, regime, analysis: Analysis, k: int) -> dict:
    level = stats.bonferroni_level(k, analysis.alpha)
    blocks_of, _ = analysis.seeds(dataset)
    by_fw = _effects(records, row, dataset, regime, blocks_of)
    kept = {fw: [(s, m) for s, m in pairs if math.isfinite(m.effect)] for fw, pairs in by_fw.items()}
    excluded = [
        {"framework": fw, "seed": s, "why": m.why} for fw, pairs in by_fw.items() for s, m in pairs
        if not math.isfinite(m.effect)
    ]  # fmt: skip
    n_all = sum(len(p) for p in by_fw.values())
    measured = [m for pairs in kept.values() for _, m in pairs]
    n = len(measured)
    regime_ok = bool(measured) and all(m.regime_ok for m in measured)
    min_effect = (analysis.min_effects or {}).get(row_key(row), row.min_effect)
    detail = _detail(measured)
    blocks = {fw: [m.effect for _, m in pairs] for fw, pairs in kept.items() if pairs}
    ci = None
    if n - len(blocks) >= 1:
        ci = stats.blocked_interval(blocks, level)
    if ci is None:
        verdict = "inconclusive"
        detail = f"too few seeds measured ({n}); " + detail
    elif len(excluded) > analysis.max_excluded * n_all:
        verdict = "inconclusive"
        detail = f"{len(excluded)} of {n_all} seeds not measurable; " + detail
    else:
        verdict = stats.verdict(ci, min_effect, absence=row.absence) if regime_ok else "inconclusive"
    return Claim(
        claim=row.claim, model="mlp", framework="pooled" if len(blocks_of) > 1 else next(iter(blocks_of)),
        verdict=verdict, holds=verdict == "holds", component=row.component, lesson=row.lesson,
        statement=row.statement, metric=row.metric, min_effect=min_effect,
        effect=None if ci is None else ci.effect, ci_low=None if ci is None else ci.low,
        ci_high=None if ci is None else ci.high, seeds=n,
        per_seed=[float(m.effect) for pairs in kept.values() for _, m in pairs], regime_ok=regime_ok,
        setting=setting(records, row, dataset, regime), detail=detail,
        dataset=dataset, regime=regime, level=level, family_size=k if row.family else None,
        in_family=row.family, row=row_key(row), df=None if ci is None else ci.df, sd=None if ci is None else ci.sd,
        blocks={fw: len(p) for fw, p in kept.items()},
        per_seed_seeds=[s for pairs in kept.values() for s, _ in pairs],
        per_seed_frameworks=[fw for fw, pairs in kept.items() for _ in pairs], excluded=excluded or None,
        kind=analysis.kind,
    ).to_dict()  # fmt: skip


def implementation_check(records: list[dict], analysis: Analysis) -> list[dict]:
    """Per row of the family: the per-seed effects of torch and linen on the shared seeds and
    their difference; ``ok`` when the mean difference is within the row's minimum effect."""
    out = []
    for row, dataset, regime in family(records):
        if not row.family:
            continue
        _, shared = analysis.seeds(dataset)
        by_fw = _effects(records, row, dataset, regime, {"torch": shared, "linen": shared})
        t = {s: m.effect for s, m in by_fw["torch"]}
        li = {s: m.effect for s, m in by_fw["linen"]}
        both = sorted(s for s in set(t) & set(li) if math.isfinite(t[s]) and math.isfinite(li[s]))
        if not both:
            continue
        diff = [t[s] - li[s] for s in both]
        m = (analysis.min_effects or {}).get(row_key(row), row.min_effect)
        out.append(ImplementationCheck(
            claim=row.claim, dataset=dataset, regime=regime, seeds=both, torch_effects=[t[s] for s in both],
            linen_effects=[li[s] for s in both], mean_diff=float(np.mean(diff)), max_abs_diff=float(np.max(np.abs(diff))),
            min_effect=m, ok=bool(abs(np.mean(diff)) < m),
        ).to_dict())  # fmt: skip
    return out


def facts(records: list[dict]) -> list[dict]:
    """The facts of eval mode, per dataset and framework, over every probed network."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for f in fact_check([r for r in records if r["dataset"] == dataset]):
            row = FACT[f["claim"]]
            out.append(Fact(
                claim=row.claim, dataset=dataset, framework=f["framework"], holds=f["holds"], networks=f["networks"],
                lesson=row.lesson, statement=row.statement, spec_id=row.spec_id, test=row.test,
                measured={k: v for k, v in f.items() if k not in ("claim", "framework", "holds", "networks")},
            ).to_dict())  # fmt: skip
    return out


def summary(records: list[dict], analysis: Analysis) -> dict:
    """``meta.train_summary``: the verdicts of the family and beside it, the
    implementation check, the facts, and each run's agreement across frameworks."""
    rows = family(records)
    datasets = list(dict.fromkeys(ds for _, ds, _ in rows))
    k = analysis.k or max(1, sum(row.family for row, _, _ in rows))
    verdicts = [_claim(records, row, ds, regime, analysis, k) for row, ds, regime in rows]
    fam = {
        "k": k, "alpha": analysis.alpha, "level": stats.bonferroni_level(k, analysis.alpha),
        "correction": "Bonferroni", "kind": analysis.kind,
        "blocks": {ds: {fw: list(s) for fw, s in analysis.seeds(ds)[0].items()} for ds in datasets},
        "shared_seeds": {ds: list(analysis.seeds(ds)[1]) for ds in datasets}, "max_excluded": analysis.max_excluded,
    }  # fmt: skip
    return {
        "claims": verdicts,
        "family": fam,
        "implementation_check": implementation_check(records, analysis),
        "facts": facts(records),
        "framework_agreement": framework_agreement(records),
    }


# --- 0.2's analysis: one 95% verdict per framework ------------------------------------------------


def judge(records: list[dict], framework: str) -> list[dict]:
    """One Claim per row of the family, for one framework's runs on every seed they have,
    at 95% (0.2's analysis; a dataset's rows for each dataset in the records)."""
    out = []
    for row, dataset, regime in family([r for r in records if r["framework"] == framework]):
        if not row.family:
            continue
        seeds = tuple(Runs(records, framework, dataset).seeds)
        c = _claim(records, row, dataset, regime, Analysis({framework: seeds}), 1)
        out.append(c)
    return out


def claims(records: list[dict]) -> list[dict]:
    """Every claim in every framework that ran, and whether the frameworks agree."""
    out = [c for fw in ("torch", "linen") if any(r["framework"] == fw for r in records) for c in judge(records, fw)]
    verdicts: dict[tuple, set] = {}
    for c in out:
        verdicts.setdefault((c["claim"], c.get("dataset"), c.get("regime")), set()).add(c["verdict"])
    return [{**c, "agrees": len(verdicts[(c["claim"], c.get("dataset"), c.get("regime"))]) == 1} for c in out]


def framework_agreement(records: list[dict]) -> list[dict]:
    """Per run made in both frameworks: the final test accuracy of each and their difference."""
    runs: dict[tuple, dict] = {}
    for r in records:
        search = (r.get("search") or {}).get("criterion")
        key = (r["claim"], r["model"], r["use_bn"], r["dropout"], r["lr"], r["seed"], r.get("variant", "standard"),
               r.get("dataset"), r.get("label_noise"), r.get("train_size"), search)  # fmt: skip
        runs.setdefault(key, {})[r["framework"]] = r
    rows = []
    for (claim, model, use_bn, dropout, lr, seed, variant, *_), by_fw in runs.items():
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
