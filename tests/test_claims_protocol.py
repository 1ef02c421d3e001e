"""A confirmatory claim is judged by a protocol fixed before its run: the file is read and
checked against the claims table, its seeds are disjoint blocks, the learning rates are
chosen on validation and searched by bisection, the frameworks are pooled as blocks at
the corrected level, and what cannot be measured is left out by a stated rule
(``compare.experiments.claims``: ``protocol``, ``design``, ``effects``, ``verdicts``)."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from compare.experiments.claims import design, effects, facts, protocol, stats, verdicts

TOY = Path(__file__).parent / "data" / "claims_toy_protocol.toml"


def test_the_protocol_file_is_read_with_its_hash_its_family_and_its_seed_blocks():
    d = protocol.load(TOY)
    (plan,) = d.plans
    assert d.meta["sha256"] == hashlib.sha256(TOY.read_bytes()).hexdigest() and d.meta["kind"] == "pilot"
    assert d.meta["protocol"]["protocol"]["name"] == "toy" and d.meta["deviations"] == []
    assert (plan.seeds, plan.second_seeds, plan.shared_seeds) == ((700, 701), (702, 703), (700, 702))
    assert plan.hidden == (16, 16) and plan.target_accuracy == 0.5 and plan.experiment_seeds["order"] == 0
    assert d.analysis.k == 12 and d.analysis.kind == "pilot"  # 8 rows + a second regime for 2 of them; 1 beside
    assert d.analysis.min_effects["bn_allows_higher_learning_rates"] == 0.3
    assert plan.experiments(700) == ("learning_rate", "overfitting")  # order: 0 seeds, not even on shared ones


def test_seeds_on_the_command_line_are_recorded_as_a_deviation_and_make_the_run_exploratory():
    d = protocol.load(TOY, seeds=3, seed_offset=50)
    (plan,) = d.plans
    assert plan.seeds == (50, 51, 52) and plan.second_seeds == (53, 54, 55)
    assert d.meta["deviations"] == ["--seeds 3", "--seed-offset 50"] and d.analysis.kind == "exploratory"


def test_a_protocol_that_differs_from_the_claims_table_is_refused_with_every_problem():
    text = TOY.read_text()
    text = text.replace('row = "bn_speeds_up_training"\nmin_effect = 0.2',
                        'row = "bn_speeds_up_training"\nmin_effect = 0.2\narms = ["BatchNorm", "plain"]')  # fmt: skip
    text = text.replace('row = "order_avoids_variance_shift"', 'row = "order_avoids_the_shift"')
    text = text.replace(
        'min_effect = 0.1\n\n[[claims]]\nrow = "bn_improves', 'min_effect = 0\n\n[[claims]]\nrow = "bn_improves'
    )
    with pytest.raises(protocol.ProtocolError) as e:
        protocol.parse(text)
    message = str(e.value)
    assert "rows ['order_avoids_variance_shift'] are not stated" in message
    assert "unknown row 'order_avoids_the_shift'" in message
    assert "bn_speeds_up_training: arms ['BatchNorm', 'plain'] is not the table's ['plain', 'BatchNorm']" in message
    assert "bn_reduces_internal_covariate_shift: min_effect must be positive" in message


def _lr_run(lr, ok_target, ok_stable=True, *, arm="BatchNorm", search=None, val_steps=None, test_steps=None):
    use_bn, p = design.ARMS[arm]
    acc = 0.95 if ok_target else (0.7 if ok_stable else 0.1)
    return {
        "claim": "lr_search" if search else "learning_rate", "framework": "torch", "dataset": "digits", "seed": 0,
        "use_bn": use_bn, "dropout": 0.5 if p is None else p, "lr": lr, "variant": "standard", "diverged": not ok_stable,
        "final_val_acc": acc, "final_test_acc": acc, "target_accuracy": 0.9, "search": search, "epochs": 10,
        "batch_size": 64, "train_size": 899, "steps_to_target": test_steps, "val_steps_to_target": val_steps,
        "target_check": "step",
    }  # fmt: skip


def test_the_learning_rate_search_bracket_follows_from_the_runs_and_says_when_it_is_censored():
    grid = [_lr_run(lr, lr <= 0.3) for lr in (0.01, 0.1, 0.3, 1.0, 3.0)]
    assert design.search_bracket(grid, "target") == (0.3, 1.0)
    searched = [*grid, _lr_run(0.55, True, search="t"), _lr_run(0.74, False, search="t")]
    assert design.search_bracket(searched, "target") == (0.55, 0.74)
    estimate, censored = design.largest_lr(searched, "target", (0.01, 3.0))
    assert estimate == pytest.approx(math.sqrt(0.55 * 0.74)) and censored == ""
    assert design.largest_lr([_lr_run(lr, False) for lr in (0.01, 0.1)], "target", (0.01, 0.1)) == (
        pytest.approx(0.01 / math.sqrt(10)),
        "below",
    )
    assert design.largest_lr([_lr_run(lr, True) for lr in (0.01, 30.0)], "target", (0.01,)) == (30.0, "above")
    # a diverged run fails both criteria; one that stays above 50% without reaching the target is stable
    assert not design.passes(_lr_run(1.0, False, False), "stable") and design.passes(_lr_run(1.0, False), "stable")


def test_each_arms_learning_rate_is_chosen_on_validation_and_its_steps_counted_on_test():
    """Validation says lr 0.1 (8 steps) where the test split would have said 0.3 (5): the
    arm's steps are the test steps at 0.1 (12), never the test's own minimum."""
    arm = [
        _lr_run(0.1, True, val_steps=8, test_steps=12),
        _lr_run(0.3, True, val_steps=9, test_steps=5),
        _lr_run(1.0, False, val_steps=None, test_steps=None),
    ]
    assert effects.chosen(arm)["lr"] == 0.1 and effects.steps(effects.chosen(arm)) == 12
    never = [_lr_run(0.1, False, val_steps=None), _lr_run(0.3, False, False, val_steps=None)]
    assert effects.chosen(never)["lr"] == 0.1 and effects.steps(never[0]) == 10 * (899 // 64) + 1  # a floor


def _gap_runs(fw, seed, gap_ref, gap_drop, noise=0.3):
    out = []
    for p, gap in ((0.0, gap_ref), (0.5, gap_drop), (None, gap_ref)):
        test = [1.0] * 6
        curves = {"test_loss": test, "train_loss": [0.0] * 6, "train_clean_loss": [t - gap for t in test]}
        out.append({
            "claim": "overfitting", "framework": fw, "dataset": "digits", "seed": seed, "use_bn": p is None,
            "dropout": p or 0.0, "variant": "standard", "label_noise": noise, "diverged": False, "curves": curves,
            "final_train_acc": 1.0, "final_test_acc": 0.8, "lr": 0.05, "batch_size": 32, "epochs": 6, "model": "mlp",
            "train_size": 300, "hidden": [256, 256],
        })  # fmt: skip
    return out


def test_the_frameworks_are_pooled_on_their_own_seeds_and_the_shared_runs_are_the_check_only():
    """torch seeds 0-3 and linen 4-7 pooled as blocks (linen's effects shifted by 0.1: a block
    effect); seed 0 also ran in linen and seed 4 in torch with effects far off: they change
    nothing in the verdict and show up in the implementation check."""
    torch_e, linen_e = [0.50, 0.52, 0.48, 0.51], [0.60, 0.61, 0.59, 0.62]
    recs = [r for s, e in enumerate(torch_e) for r in _gap_runs("torch", s, 1.0, 1.0 - e)]
    recs += [r for s, e in enumerate(linen_e, start=4) for r in _gap_runs("linen", s, 1.0, 1.0 - e)]
    recs += _gap_runs("linen", 0, 1.0, 0.0) + _gap_runs("torch", 4, 1.0, 1.0)  # the shared seeds' other framework
    analysis = verdicts.Analysis({"torch": (0, 1, 2, 3), "linen": (4, 5, 6, 7)}, shared=(0, 4), k=24)
    summary = verdicts.summary(recs, analysis)
    (drop,) = [c for c in summary["claims"] if c["claim"] == "dropout_reduces_overfitting"]
    ci = stats.blocked_interval({"torch": torch_e, "linen": linen_e}, 1 - 0.05 / 24)
    assert (drop["effect"], drop["ci_low"], drop["ci_high"]) == pytest.approx((ci.effect, ci.low, ci.high))
    assert drop["verdict"] == "holds" and drop["family_size"] == 24 and drop["blocks"] == {"torch": 4, "linen": 4}
    assert drop["per_seed_seeds"] == [0, 1, 2, 3, 4, 5, 6, 7] and drop["df"] == 6 and drop["regime"] == "noisy"
    check = {c["claim"]: c for c in summary["implementation_check"]}["dropout_reduces_overfitting"]
    assert check["seeds"] == [0, 4] and check["torch_effects"] == pytest.approx([0.5, 0.0])
    assert check["linen_effects"] == pytest.approx([1.0, 0.6]) and not check["ok"]


def test_a_seed_that_cannot_be_measured_is_left_out_and_listed_and_too_many_make_the_row_inconclusive():
    recs = [r for s in range(6) for r in _gap_runs("torch", s, 1.0, 0.5)]
    recs = [r for r in recs if not (r["seed"] == 5 and r["dropout"] == 0.5)]  # its Dropout run is missing
    summary = verdicts.summary(recs, verdicts.Analysis({"torch": tuple(range(6))}, max_excluded=0.2))
    (drop,) = [c for c in summary["claims"] if c["claim"] == "dropout_reduces_overfitting"]
    assert drop["seeds"] == 5 and drop["excluded"][0]["seed"] == 5 and "StopIteration" in drop["excluded"][0]["why"]
    assert drop["verdict"] == "holds"  # 1 of 6 left out: within 20%
    strict = verdicts.summary(recs, verdicts.Analysis({"torch": tuple(range(6))}, max_excluded=0.1))
    (drop,) = [c for c in strict["claims"] if c["claim"] == "dropout_reduces_overfitting"]
    assert drop["verdict"] == "inconclusive" and "1 of 6 seeds not measurable" in drop["detail"]


def test_the_gap_is_measured_on_the_training_images_whose_labels_are_right():
    (ref, *_) = _gap_runs("torch", 0, 0.4, 0.1)
    assert effects.generalisation_gap(ref) == pytest.approx(0.4)  # not test - train_loss = 1.0
    del ref["curves"]["train_clean_loss"]  # 0.2's records: the training loss on every label
    assert effects.generalisation_gap(ref) == pytest.approx(1.0)


def test_the_eval_mode_facts_hold_only_when_every_probed_network_shows_them():
    def probed(res, dep, change, drop):
        return {"framework": "torch", "dataset": "digits", "dropout": 0.5,
                "probes": {"bn_change": change, "bn_affine_residual": res, "bn_batch_dependence": dep,
                           "dropout_change": drop}}  # fmt: skip

    good = [probed(5e-8, 0.0, 0.6, 0.0), probed(6e-8, 2e-6, 0.5, 0.0)]
    assert all(f["holds"] for f in facts.fact_check(good))
    bad = {f["claim"]: f for f in facts.fact_check([*good, probed(5e-8, 0.0, 0.6, 1e-3), probed(1e-2, 0.0, 0.6, 0.0)])}
    assert not bad["bn_active_at_inference"]["holds"] and bad["bn_active_at_inference"]["max_affine_residual"] == 1e-2
    assert not bad["dropout_active_at_inference"]["holds"] and bad["dropout_active_at_inference"]["networks"] == 4


def test_the_pilots_spread_gives_the_seed_count_and_the_count_has_the_power():
    """The same rule the confirmatory protocol's counts come from (``stats.seeds_for_power``
    on the upper 80% limit of the pilot's sd), on a made-up pilot of 10 seeds per framework."""
    rng = np.random.default_rng(0)
    sd = float(np.std(rng.normal(0.3, 0.2, 20), ddof=1))
    upper = stats.sd_upper(sd, 18)
    n = stats.seeds_for_power(upper, 0.2, stats.bonferroni_level(24))
    assert n % 2 == 0 and stats.power(n, upper, 0.2, stats.bonferroni_level(24)) >= 0.8
    assert stats.power(n - 2, upper, 0.2, stats.bonferroni_level(24)) < 0.8
