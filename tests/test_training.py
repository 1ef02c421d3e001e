"""The training runs of the claims: complete records, frameworks that agree, variants and
probes that measure what they say."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from compare import registry
from compare.experiments import data, nets, probes, training

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


def test_the_same_seed_gives_bit_identical_runs_twice_in_a_row_in_each_framework():
    """CPU, dropout active: torch's seeded global generator and linen's folded keys make
    every mask, and so every loss, repeat exactly."""
    cfg = training.RunConfig("dropout", "cnn", True, 0.2, 0.05, epochs=2, seed=3)
    first, second = training.run_one(cfg, _small_digits()), training.run_one(cfg, _small_digits())
    for a, b in zip(first, second, strict=True):
        assert a["framework"] == b["framework"]
        assert a["curves"] == b["curves"]


def test_the_internal_covariate_shift_is_the_same_in_torch_and_linen_when_nothing_is_random():
    """BatchNorm, no Dropout, same weights and batches: Santurkar's ||G - G'|| at every layer
    with layers before it (fc2 and head), with each framework's own optimizer step, after
    every epoch, agrees across the frameworks (measured 2e-7 relative after two epochs; the
    bound leaves room for float32 summation order as training drifts apart)."""
    cfg = training.RunConfig("learning_rate", "mlp", True, 0.0, 0.1, epochs=2, hidden=(32, 32), probes=("ics",))
    torch_rec, linen_rec = training.run_one(cfg, _small_digits())
    assert set(torch_rec["probes"]["ics_l2"]) == {"fc2", "head"}
    for key in ("ics_l2", "ics_cos", "ics_rel"):
        for layer, values in torch_rec["probes"][key].items():
            assert len(values) == 2 and all(v > 0 for v in values)
            np.testing.assert_allclose(linen_rec["probes"][key][layer], values, rtol=1e-3)


def test_the_internal_covariate_shift_moves_the_layers_before_with_the_optimizers_own_momentum_step():
    """After a few steps the momentum buffer is not zero: G' is taken after the step SGD with
    momentum would make, ``p - lr * (0.9 * buf + g)``, not after a plain ``p - lr * g``; and
    measuring changes nothing of the run (parameters and optimizer state untouched)."""
    import torch

    net = _trained("torch", 0.0, epochs=1)
    params = {k: v.detach().clone() for k, v in net.model.named_parameters()}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    state = {k: v["momentum_buffer"].clone() for k, v in zip(params, net.opt.state.values(), strict=True)}
    stepped = net._optimizer_step(params, grads)
    for k, v in params.items():
        expected = v - 0.1 * (0.9 * state[k] + grads[k])
        torch.testing.assert_close(stepped[k], expected, rtol=1e-6, atol=1e-7)
    before = {k: v.detach().clone() for k, v in net.model.named_parameters()}
    net.gradient_shift(np.arange(64), probes.ics_layers(2))
    for k, v in net.model.named_parameters():
        assert torch.equal(v, before[k])
    assert all(torch.equal(net.opt.state[p]["momentum_buffer"], state[k]) for k, p in net.model.named_parameters())


def test_the_target_is_checked_after_every_step_on_the_validation_and_test_splits():
    ds = data.load("digits", seed=3, val_fraction=0.2, test_fraction=0.3)
    cfg = training.RunConfig(
        "learning_rate", "mlp", True, 0.0, 0.1, epochs=2, seed=3, hidden=(32, 32), track_steps=True
    )
    (rec,) = training.run_one(cfg, ds, frameworks=("torch",), target=0.8)
    per_epoch = len(ds.x_train) // 64
    assert rec["target_check"] == "step" and 0 < rec["steps_to_target"] <= 2 * per_epoch
    assert 0 < rec["val_steps_to_target"] <= 2 * per_epoch and "val_acc" in "".join(rec["curves"])
    coarse = training.run_one(dataclasses.replace(cfg, track_steps=False), ds, frameworks=("torch",), target=0.8)[0]
    assert coarse["steps_to_target"] % per_epoch == 0 and coarse["steps_to_target"] >= rec["steps_to_target"]
    assert coarse["curves"] == rec["curves"]  # checking more often changes nothing of the run


@pytest.mark.parametrize("framework", ["torch", "linen"])
def test_eval_mode_dropout_is_exactly_the_identity_and_eval_mode_batchnorm_a_fixed_affine_map(framework):
    """After two epochs with BatchNorm and Dropout: eval-mode Dropout changes nothing (exactly
    0); eval-mode BatchNorm changes its input by tens of percent, yet is an affine map per
    channel (least-squares residual 1e-7 of the output's scale: float32) and a sample's
    logits do not depend on the rest of the batch (torch 0, XLA 2e-6: its matmul tiles)."""
    cfg = training.RunConfig(
        "learning_rate", "mlp", True, 0.5, 0.1, epochs=2, hidden=(32, 32), probes=("active_at_inference",)
    )
    (rec,) = training.run_one(cfg, _small_digits(), frameworks=(framework,))
    pr = rec["probes"]
    assert pr["dropout_change"] == 0.0
    assert pr["bn_change"] > 0.05
    assert pr["bn_affine_residual"] < 1e-5 and pr["bn_batch_dependence"] < 1e-4


def _trained(framework: str, dropout: float, epochs: int = 2):
    ds = _small_digits()
    cfg = training.RunConfig("learning_rate", "mlp", False, dropout, 0.1, epochs=epochs, hidden=(32, 32))
    spec = training.model_spec("mlp", ds, False, dropout, (32, 32))
    init = spec.build_torch().state_dict()
    net = nets.TorchNet(spec, ds, cfg, init) if framework == "torch" else nets.LinenNet(spec, ds, cfg, init)
    for epoch in range(epochs):
        net.train_epoch(data.batches(len(ds.x_train), cfg.batch_size, 0, epoch))
    return net


@pytest.mark.parametrize("framework", ["torch", "linen"])
def test_ablating_no_units_keeps_the_accuracy_and_ablating_all_leaves_one_prediction(framework):
    net = _trained(framework, 0.0)
    out = probes.ablation(net, (0.0, 0.5, 1.0), draws=2)
    assert out["ablation_acc"]["0.0"] == out["ablation_acc_rescaled"]["0.0"] == out["ablation_full_acc"]
    assert "1.0" not in out["ablation_acc_rescaled"]  # nothing is left to rescale
    every = {name: np.zeros(32, np.float32) for name in ("drop1", "drop2")}
    (only,) = np.unique(net.logits("test", ablate=every).argmax(-1))  # only the head's bias is left
    assert out["ablation_acc"]["1.0"] == float(np.mean(net.labels("test") == only))


@pytest.mark.parametrize("framework", ["torch", "linen"])
def test_monte_carlo_dropout_of_a_network_without_dropout_is_its_eval_mode(framework):
    """p = 0: every stochastic pass is the eval-mode network, so the ensemble, each member
    and weight scaling give the same accuracy and the same predictions, exactly."""
    out = probes.ensemble(_trained(framework, 0.0), passes=4)
    assert out["single_acc"] == out["eval_acc"] == out["mc_acc"] and out["eval_mc_agreement"] == 1.0


@pytest.mark.parametrize("framework", ["torch", "linen"])
def test_monte_carlo_dropout_draws_a_different_thinned_network_each_pass(framework):
    net = _trained(framework, 0.5)
    passes = net.stochastic_logits("test", 3)
    assert not np.array_equal(passes[0], passes[1]) and not np.array_equal(passes[1], passes[2])


def test_linen_dropout_before_batchnorm_is_drawn_once_although_flaxbn_batchnorm_calls_its_parent():
    """``nn.intercept_methods`` also intercepts a subclass's ``super().__call__``; the variant
    must act on the outermost call only: with p = 0.5 half of BatchNorm's inputs are zero
    (0.75 if the mask were applied twice). 64 x 256 draws: the binomial standard deviation
    of the fraction is 0.004; the bound is 5 of them."""
    import flax.linen as nn
    import jax

    spec = registry.get("mlp").replace(in_features=64, hidden=(256,), num_classes=10, dropout=0.5, use_bn=True)
    model = spec.build_linen()
    x = jax.random.normal(jax.random.key(1), (64, 64)) + 3.0  # no exact zeros before the dropout
    variables = model.init(jax.random.key(0), x, train=False)
    with nn.intercept_methods(nets._interceptor("dropout_before_bn", 0.5, 1, capture=True)):
        _, sown = model.apply(
            variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats", "intermediates"]
        )
    ((dropped, _),) = sown["intermediates"]["bn1"]["io"]
    assert len(sown["intermediates"]["bn1"]["io"]) == 1
    assert abs(float(np.mean(np.asarray(dropped) == 0.0)) - 0.5) < 0.02


def test_an_unknown_variant_or_probe_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown variant 'dropout_after_head'.*noisy_bn"):
        training.run_one(
            training.RunConfig("order", "mlp", True, 0.5, 0.1, 1, variant="dropout_after_head"),
            _small_digits(),
            frameworks=("torch",),
        )
    with pytest.raises(ValueError, match=r"unknown probes \['saliency'\].*ensemble"):
        training.run_one(
            training.RunConfig("order", "mlp", True, 0.5, 0.1, 1, probes=("saliency",)),
            _small_digits(),
            frameworks=("torch",),
        )


def test_a_subset_is_class_balanced_and_its_noisy_labels_are_always_wrong():
    ds = data.load("digits")
    clean, noisy = data.subset(ds, 300, 0.0), data.subset(ds, 300, 0.3)
    np.testing.assert_array_equal(clean.x_train, noisy.x_train)  # the same images
    assert np.bincount(clean.y_train).tolist() == [30] * 10
    wrong = noisy.y_train != clean.y_train
    assert 0.22 < wrong.mean() < 0.38  # 300 Bernoulli(0.3) draws: 3.4 standard deviations each side
    assert noisy.x_test is ds.x_test


def test_a_subset_that_cannot_be_drawn_names_every_problem():
    with pytest.raises(ValueError, match="fewer than one image per class.*label_noise must be in"):
        data.subset(data.load("digits"), 5, 1.5)


def test_each_seed_draws_its_own_split_and_its_own_subset_and_wrong_labels():
    a, b = (
        data.load("digits", seed=1, val_fraction=0.2, test_fraction=0.3),
        data.load("digits", seed=2, val_fraction=0.2, test_fraction=0.3),
    )
    assert (len(a.x_train), len(a.x_val), len(a.x_test)) == (899, 359, 539)
    assert not np.array_equal(a.x_test, b.x_test)
    rows = {x.tobytes() for x in (*a.x_train, *a.x_val, *a.x_test)}
    assert len(rows) >= 1797 - 20  # disjoint splits (a few digits images are duplicates of each other)
    again = data.load("digits", seed=1, val_fraction=0.2, test_fraction=0.3)
    np.testing.assert_array_equal(again.x_val, a.x_val)
    s1, s2 = data.subset(a, 300, 0.3, seed=1), data.subset(a, 300, 0.3, seed=2)
    assert not np.array_equal(s1.y_train_true, s2.y_train_true) or not np.array_equal(s1.x_train, s2.x_train)
    right = s1.y_train == s1.y_train_true
    assert 0.62 < right.mean() < 0.78 and np.array_equal(data.subset(a, 300, 0.0, seed=1).x_train, s1.x_train)
    assert set(nets.splits(s1)) == {"train", "test", "val", "train_clean"}
    assert len(nets.splits(s1)["train_clean"][0]) == right.sum()


def test_the_synthetic_task_is_generated_from_the_seed_and_its_noise_sets_its_difficulty():
    """The same seed gives the same arrays (to both frameworks); another seed other images;
    more noise lowers what a linear classifier reaches (measured 0.97 at 0.5, 0.47 at 2.0)."""
    from sklearn.linear_model import LogisticRegression

    from compare.experiments import synthetic

    x, y = synthetic.images(5)
    x2, y2 = synthetic.images(5)
    np.testing.assert_array_equal(x, x2) and np.testing.assert_array_equal(y, y2)
    assert x.shape == (1800, 1, 8, 8) and x.dtype == np.float32 and np.bincount(y).tolist() == [180] * 10
    assert not np.array_equal(synthetic.images(6)[0], x)

    def linear_accuracy(noise):
        ds = data.load("synthetic", seed=0, test_fraction=0.3, synthetic={"noise": noise})
        clf = LogisticRegression(max_iter=1000).fit(ds.x_train.reshape(len(ds.x_train), -1), ds.y_train)
        return clf.score(ds.x_test.reshape(len(ds.x_test), -1), ds.y_test)

    assert linear_accuracy(0.5) > linear_accuracy(2.0) + 0.3
    with pytest.raises(ValueError, match="similarity 1.0 in \\[0, 1\\)"):
        synthetic.images(0, similarity=1.0)
