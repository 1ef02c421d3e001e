"""The training comparison: complete records, frameworks that agree, claims evaluated."""

from __future__ import annotations

import math

import numpy as np

from compare.experiments import claims, data, training

RECORD_FIELDS = {
    "claim", "model", "framework", "use_bn", "dropout", "lr", "epochs", "final_train_loss", "final_train_acc",
    "final_test_loss", "final_test_acc", "diverged", "wall_s", "steps_to_target", "curves",
}  # fmt: skip


def _small_digits() -> data.Dataset:
    ds = data.load("digits")
    return data.Dataset(ds.name, ds.x_train[:256], ds.y_train[:256], ds.x_test[:256], ds.y_test[:256], 10)


def test_a_tiny_run_gives_complete_records_and_both_frameworks_follow_the_same_losses():
    """Same initial weights, same batches, no dropout: the eval-mode losses after each epoch
    differ only through the running variance (torch unbiased, stock Flax biased: a factor
    n/(n-1) = 64/63 in its batch term). Measured max relative difference 2e-3."""
    cfg = training.RunConfig("batchnorm", "mlp", True, 0.0, 0.05, epochs=3)
    torch_rec, linen_rec = training.run_one(cfg, _small_digits())
    for r in (torch_rec, linen_rec):
        assert RECORD_FIELDS <= set(r) and not r["diverged"] and r["wall_s"] > 0
        assert len(r["curves"]["test_acc"]) == 3 and 0 <= r["final_test_acc"] <= 1
    np.testing.assert_allclose(
        linen_rec["curves"]["train_loss"], torch_rec["curves"]["train_loss"], rtol=2e-2, atol=1e-3
    )
    np.testing.assert_allclose(linen_rec["curves"]["test_loss"], torch_rec["curves"]["test_loss"], rtol=2e-2, atol=1e-3)


def test_a_diverging_run_is_marked_and_has_no_final_numbers():
    cfg = training.RunConfig("batchnorm", "mlp", False, 0.0, 50.0, epochs=2)
    for r in training.run_one(cfg, _small_digits()):
        assert r["diverged"] and math.isnan(r["final_test_acc"])


def _fake(claim, model, fw, use_bn=True, dropout=0.0, lr=0.1, acc=0.95, diverged=False, steps=100, gap=0.1, seed=0):
    curves = {"train_loss": [0.1] * 5, "test_loss": [0.1 + gap] * 5, "train_acc": [1.0] * 5, "test_acc": [acc] * 5}
    return {
        "claim": claim, "model": model, "framework": fw, "use_bn": use_bn, "dropout": dropout, "lr": lr, "seed": seed,
        "final_test_acc": float("nan") if diverged else acc, "diverged": diverged, "steps_to_target": steps, "curves": curves,
    }  # fmt: skip


def test_the_batchnorm_claim_holds_when_bn_is_stable_at_a_learning_rate_where_plain_diverges():
    recs = [
        _fake("batchnorm", "mlp", "torch", True, lr=0.1),
        _fake("batchnorm", "mlp", "torch", True, lr=1.0),
        _fake("batchnorm", "mlp", "torch", False, lr=0.1),
        _fake("batchnorm", "mlp", "torch", False, lr=1.0, diverged=True),
    ]
    assert claims.batchnorm_claim(recs, "mlp", "torch")["holds"]
    recs[1] = _fake("batchnorm", "mlp", "torch", True, lr=1.0, diverged=True)
    assert not claims.batchnorm_claim(recs, "mlp", "torch")["holds"]


def test_the_dropout_claim_holds_only_when_the_gap_shrinks_as_p_grows():
    shrinking = [_fake("dropout", "mlp", "torch", dropout=p, gap=g) for p, g in [(0.0, 0.3), (0.2, 0.2), (0.5, 0.1)]]
    assert claims.dropout_claim(shrinking, "mlp", "torch")["holds"]
    mixed = [_fake("dropout", "mlp", "torch", dropout=p, gap=g) for p, g in [(0.0, 0.3), (0.2, 0.35), (0.5, 0.1)]]
    verdict = claims.dropout_claim(mixed, "mlp", "torch")
    assert not verdict["holds"] and "not monotone" in verdict["detail"]


def test_the_same_seed_gives_bit_identical_runs_twice_in_a_row_in_each_framework():
    """CPU, dropout active: torch's seeded global generator and linen's folded keys make
    every mask, and so every loss, repeat exactly."""
    cfg = training.RunConfig("dropout", "cnn", True, 0.2, 0.05, epochs=2, seed=3)
    first, second = training.run_one(cfg, _small_digits()), training.run_one(cfg, _small_digits())
    for a, b in zip(first, second, strict=True):
        assert a["framework"] == b["framework"]
        assert a["curves"] == b["curves"]
