"""How a claim of the lesson gets its verdict: the interval over seeds, the minimum effect,
the regime check, the two frameworks (``compare.experiments.stats`` and ``.claims``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from compare.experiments import claims
from compare.experiments.claims import stats


def test_the_interval_is_the_paired_t_interval_of_the_mean():
    """[1, 2, 3, 4, 5]: mean 3, sd sqrt(2.5), t(0.975, 4) = 2.7764451: bounds 1.0367568 and 4.9632432."""
    ci = stats.interval([1, 2, 3, 4, 5])
    assert ci.effect == 3.0 and ci.n == 5 and ci.df == 4 and ci.level == 0.95
    assert ci.low == pytest.approx(1.0367568, abs=1e-6) and ci.high == pytest.approx(4.9632432, abs=1e-6)


def test_t_quantiles_are_exact_above_30_degrees_of_freedom():
    """0.2 returned the normal 1.96 above df = 30: at df = 31 the exact quantile is 2.0395,
    so its intervals were 3.9% too narrow."""
    assert stats.t_quantile(31) == pytest.approx(2.039513, abs=1e-6)
    assert stats.t_quantile(4) == pytest.approx(2.776445, abs=1e-6)
    assert stats.t_quantile(10**6) == pytest.approx(1.959966, abs=1e-5)


def test_bonferroni_intervals_are_wider_by_the_quantile_at_one_minus_alpha_over_k():
    x = [0.1, 0.3, 0.2, 0.4, 0.25, 0.35]
    one, family = stats.interval(x), stats.interval(x, stats.bonferroni_level(24))
    assert stats.bonferroni_level(24) == pytest.approx(1 - 0.05 / 24)
    ratio = (family.high - family.effect) / (one.high - one.effect)
    assert ratio == pytest.approx(stats.t_quantile(5, 1 - 0.05 / 24) / stats.t_quantile(5), rel=1e-12)
    assert family.low < one.low and family.high > one.high and family.level == 1 - 0.05 / 24


def test_a_blocked_interval_removes_the_difference_between_blocks_from_the_error():
    """Two frameworks whose effects differ by a constant 1.0: the mean of the block means is
    the midpoint; the pooled within-block sd is that of one block (the shift is a block
    effect, not noise), with df = seeds - blocks; one block is the plain interval."""
    a = np.array([0.1, 0.3, 0.2, 0.4])
    ci = stats.blocked_interval({"torch": a, "linen": a + 1.0})
    assert ci.effect == pytest.approx(a.mean() + 0.5) and ci.df == 6 and ci.n == 8
    assert ci.sd == pytest.approx(a.std(ddof=1))
    half = stats.t_quantile(6) * a.std(ddof=1) * math.sqrt(1 / 4 + 1 / 4) / 2
    assert ci.high - ci.effect == pytest.approx(half)
    plain = stats.blocked_interval({"torch": a})
    assert (plain.low, plain.high) == (stats.interval(a).low, stats.interval(a).high)


def test_the_seed_count_for_power_matches_the_normal_approximation_and_grows_with_the_correction():
    """sd = m: the normal approximation ((z(1-a/2) + z(0.8)) sd / m)^2 gives 7.85 at a = 0.05; the
    t-based count is a little larger; Bonferroni over 24 claims needs more; a claimed
    absence (inside +-m when the truth is 0) needs its own count."""
    n = stats.seeds_for_power(1.0, 1.0, 0.95, blocks=2)
    assert n in (10, 12) and stats.power(n, 1.0, 1.0, 0.95) >= 0.8 > stats.power(n - 2, 1.0, 1.0, 0.95)
    assert stats.seeds_for_power(1.0, 1.0, stats.bonferroni_level(24)) > n
    m = stats.seeds_for_power(1.0, 1.0, 0.95, absence=True)
    assert stats.power(m, 1.0, 1.0, 0.95, absence=True) >= 0.8 > stats.power(m - 2, 1.0, 1.0, 0.95, absence=True)
    assert stats.sd_upper(1.0, 9) > 1.0


def test_identical_seeds_give_a_zero_width_interval():
    ci = stats.interval([0.25] * 5)
    assert ci.low == ci.high == 0.25


def test_an_interval_needs_two_finite_seeds():
    with pytest.raises(ValueError, match="at least two seeds"):
        stats.interval([1.0])
    with pytest.raises(ValueError, match="must be finite"):
        stats.interval([1.0, math.nan])


@pytest.mark.parametrize(
    "low, high, verdict",
    [
        (0.12, 0.30, "holds"),  # all of it at or above the minimum effect 0.1
        (0.02, 0.08, "negligible"),  # excludes zero, stays under the minimum
        (-0.05, 0.08, "negligible"),  # crosses zero but inside (-0.1, 0.1): no effect of the size claimed
        (-0.30, -0.12, "does not hold"),  # the opposite
        (-0.05, 0.30, "inconclusive"),  # crosses zero and reaches past the minimum
        (0.05, 0.30, "inconclusive"),  # straddles the minimum
    ],
)
def test_the_verdict_compares_the_interval_with_zero_and_the_minimum_effect(low, high, verdict):
    ci = stats.Interval((low + high) / 2, low, high, 5)
    assert stats.verdict(ci, 0.1) == verdict


@pytest.mark.parametrize(
    "low, high, verdict",
    [(0.0, 0.0, "holds"), (-0.3, -0.2, "holds"), (0.2, 0.3, "does not hold"), (-0.05, 0.3, "inconclusive")],
)
def test_a_claimed_absence_holds_when_the_effect_is_negligible_or_opposite(low, high, verdict):
    ci = stats.Interval((low + high) / 2, low, high, 5)
    assert stats.verdict(ci, 0.1, absence=True) == verdict


def _overfit(fw, seed, use_bn, p, gap, train_acc=1.0):
    test_loss = [1.0, 0.8, 0.9, 1.0, 1.1, 1.2]  # its minimum 0.8, then rising: the regime check's 1.1x
    curves = {"test_loss": test_loss, "train_loss": [t - gap for t in test_loss], "test_acc": [0.8] * 6,
              "train_acc": [train_acc] * 6}  # fmt: skip
    return {
        "claim": "overfitting", "model": "mlp", "framework": fw, "seed": seed, "use_bn": use_bn, "dropout": p,
        "lr": 0.05, "epochs": 6, "batch_size": 32, "variant": "standard", "dataset": "digits", "train_size": 300,
        "label_noise": 0.3, "hidden": [256, 256], "curves": curves, "final_train_acc": train_acc,
        "final_test_acc": 0.8, "diverged": False, "target_accuracy": 0.9, "steps_to_target": None,
    }  # fmt: skip


def _overfitting_runs(gaps_dropout, gaps_bn, train_acc=1.0, frameworks=("torch", "linen")):
    recs = []
    for fw in frameworks:
        for seed, (gd, gb) in enumerate(zip(gaps_dropout, gaps_bn, strict=True)):
            recs += [
                _overfit(fw, seed, False, 0.0, 1.0, train_acc),
                _overfit(fw, seed, False, 0.5, gd, train_acc),
                _overfit(fw, seed, True, 0.0, gb, train_acc),
            ]
    return recs


def _verdicts(recs):
    return {(c["claim"], c["framework"]): c for c in claims.claims(recs)}


def test_only_the_claims_whose_experiment_ran_are_judged():
    out = claims.claims(_overfitting_runs([0.5] * 5, [0.98] * 5))
    assert {c["claim"] for c in out} == {"bn_reduces_overfitting", "dropout_reduces_overfitting"}


def test_dropout_reduces_overfitting_holds_when_every_seed_shrinks_the_gap_past_the_minimum():
    """Gap 1.0 without Dropout, 0.5 +- 0.02 with it: effect 0.5 with a narrow interval, far
    above the minimum 0.1; BatchNorm's 0.02 +- 0.01 is negligible (minimum 0.05)."""
    v = _verdicts(_overfitting_runs([0.48, 0.5, 0.52, 0.49, 0.51], [0.98, 0.97, 0.99, 0.98, 0.98]))
    for fw in ("torch", "linen"):
        drop, bn = v[("dropout_reduces_overfitting", fw)], v[("bn_reduces_overfitting", fw)]
        assert drop["verdict"] == "holds" and drop["regime_ok"] and drop["agrees"] and drop["seeds"] == 5
        assert drop["effect"] == pytest.approx(0.5) and drop["ci_low"] > 0.1
        assert bn["verdict"] == "negligible" and bn["ci_high"] < 0.05
        assert set(drop) >= {"claim", "framework", "verdict", "min_effect", "effect", "ci_low", "ci_high", "seeds",
                             "regime_ok"}  # fmt: skip


def test_a_claim_judged_where_the_network_did_not_overfit_is_inconclusive_whatever_its_effect():
    """The reference did not fit its training set (train accuracy 0.9): the experiment could
    not show what Dropout does against overfitting, so no verdict but inconclusive."""
    v = _verdicts(_overfitting_runs([0.5] * 5, [0.98] * 5, train_acc=0.9))
    c = v[("dropout_reduces_overfitting", "torch")]
    assert not c["regime_ok"] and c["verdict"] == "inconclusive" and c["effect"] == pytest.approx(0.5)


def test_frameworks_that_reach_different_verdicts_are_marked_as_disagreeing():
    recs = [r for r in _overfitting_runs([0.5] * 5, [0.98] * 5, frameworks=("torch",))]
    recs += _overfitting_runs([0.95, 1.05, 0.9, 1.1, 1.0], [0.98] * 5, frameworks=("linen",))
    v = _verdicts(recs)
    assert v[("dropout_reduces_overfitting", "torch")]["verdict"] == "holds"
    assert v[("dropout_reduces_overfitting", "linen")]["verdict"] == "negligible"
    assert not v[("dropout_reduces_overfitting", "torch")]["agrees"]


def test_every_row_of_the_lesson_is_a_claim_of_the_table_or_a_fact_and_has_a_figure():
    """Ten rows are statistical claims (the table, one function each); the two about
    inference are deterministic facts of the spec; every one is drawn."""
    from compare.experiments.claims import facts
    from compare.report.figures import claims as claim_plots

    lesson_rows = {"bn_speeds_up_training", "bn_allows_higher_learning_rates", "bn_reduces_internal_covariate_shift",
                   "bn_improves_stability", "dropout_improves_stability", "bn_reduces_overfitting",
                   "dropout_reduces_overfitting", "dropout_stops_reliance_on_particular_neurons",
                   "dropout_behaves_like_an_implicit_ensemble", "bn_active_at_inference",
                   "dropout_active_at_inference", "order_avoids_variance_shift"}  # fmt: skip
    assert set(claims.ROW) | set(facts.FACT) == lesson_rows and not set(claims.ROW) & set(facts.FACT)
    assert set(claim_plots.DRAW) == set(claims.ROW)
    assert all(r.min_effect > 0 and len(r.arms) == 2 and callable(r.effect) for r in claims.ROWS)
    assert [r.name for r in claims.ROWS if not r.family] == ["unscaled"]  # the ablation without rescaling, beside
    assert {claim_plots.path_of(c) for c in facts.FACT} == {"facts_at_inference.png"}


def test_the_old_names_of_the_claims_table_still_work_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    sys.modules.pop("compare.experiments.design", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        design = importlib.import_module("compare.experiments.design")
        assert design.Spec is claims.ClaimRow and design.SPECS is claims.ROWS
        from compare.experiments import stats as old_stats
    assert old_stats.interval is stats.interval
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("design.Spec is compare.experiments.claims.effects.ClaimRow" in m for m in messages), messages


def test_the_quick_plan_puts_the_frameworks_on_disjoint_seeds_and_runs_a_few_in_both():
    quick, full = claims.PLANS["quick"], claims.PLANS["full"]
    assert not set(quick.seeds) & set(quick.second_seeds) and len(quick.seeds) >= 4
    assert set(quick.shared_seeds) <= set(quick.seeds) | set(quick.second_seeds) and len(quick.shared_seeds) == 2
    for seed in quick.all_seeds():
        assert quick.frameworks(seed) == (("torch", "linen") if seed in quick.shared_seeds else
                                          ("torch",) if seed in quick.seeds else ("linen",))  # fmt: skip
    assert len(full.seeds) > len(quick.seeds) and len(full.lrs) > len(quick.lrs)
    runs = quick.seed_runs(quick.seeds[0])
    assert {r.claim for r in runs} == {"learning_rate", "overfitting", "order"}
    assert {r.label_noise for r in runs if r.claim == "overfitting"} == {0.0, 0.3}
    assert all(r.track_steps for r in runs if r.claim == "learning_rate" and r.variant == "standard")


def test_a_tiny_plan_gives_every_row_a_pooled_verdict_a_report_and_a_figure_each(tmp_path):
    """The whole path of ``--suite train`` at toy sizes, in this process (2 seeds per
    framework, 2 learning rates, one epoch): the verdicts mean nothing here, only that each
    row has one of the four, at the Bonferroni level, with torch and linen pooled."""
    import dataclasses

    from compare.experiments.claims import runner, verdicts
    from compare.report import lesson
    from compare.report.figures import claims as claim_plots

    plan = dataclasses.replace(
        claims.PLANS["quick"], seeds=(0, 1), second_seeds=(2, 3), shared_seeds=(0,), hidden=(16, 16), lrs=(0.1, 3.0),
        lrs_above=(10.0,), search_steps=1, lr_epochs=1, overfit_size=50, overfit_epochs=2, order_epochs=1,
        target_accuracy=0.5,
    )  # fmt: skip
    records = []
    runner.run_units(runner.units([plan]), 0, lambda unit, recs, timing: records.extend(recs))
    analysis = verdicts.Analysis({"torch": plan.seeds, "linen": plan.second_seeds}, shared=plan.shared_seeds)
    summary = verdicts.summary(records, analysis)
    family = [c for c in summary["claims"] if c["in_family"]]
    assert summary["family"]["k"] == len(family) == 12 and {c["framework"] for c in family} == {"pooled"}
    assert all(c["level"] == pytest.approx(1 - 0.05 / 12) for c in summary["claims"])
    assert {c["verdict"] for c in summary["claims"]} <= set(stats.VERDICTS)
    assert all(c["blocks"] == {"torch": 2, "linen": 2} for c in family if not c.get("excluded"))
    assert {f["claim"] for f in summary["facts"]} == {"bn_active_at_inference", "dropout_active_at_inference"}
    assert {c["seeds"] == [0] for c in summary["implementation_check"]} == {True}
    results = {"meta": {"train_summary": summary}, "train": records}
    text = "\n".join(lesson.report_lines(results, ""))
    assert all(r.statement in text for r in claims.ROWS) and "claims_intervals.png" in text and "k = 12" in text
    drawn = claim_plots.draw_all(records, summary["claims"], tmp_path)
    assert set(drawn) >= {*claims.ROW, "intervals", "per_seed", "facts"}
    assert all(p.stat().st_size > 5_000 for p in drawn.values())


def test_docs_claims_md_is_generated_from_the_committed_runs_and_protocols():
    """``python -m compare.report.lesson --docs docs/claims.md`` rewrites its blocks; a hand
    edit, or a run committed without regenerating it, fails here."""
    from pathlib import Path

    from compare.report import lesson

    assert lesson.main(["--docs", str(Path(__file__).resolve().parents[1] / "docs" / "claims.md"), "--check"]) == 0
