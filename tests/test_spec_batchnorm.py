"""The BatchNorm spec: how torch, linen and nnx normalise, which statistics they keep,
and how each carries its mutable state. Flax here means the *stock* Flax layers
(``flax.linen.BatchNorm``, ``flax.nnx.BatchNorm``); flaxbn's own layers have their tests
in ``test_flaxbn_batchnorm.py``. Every test states one fact; ``SEMANTICS.md`` lists them.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from flax import nnx
from frameworks import BN, FRAMEWORKS

from compare import registry

spec = pytest.mark.spec
# Float32 forward of a BatchNorm on O(1) inputs: measured max |diff| <= 5e-7 against the
# float64 formula here; rtol 1e-5 / atol 1e-6 leave room for other BLAS/XLA builds.
RTOL, ATOL = 1e-5, 1e-6


def _x(n=16, c=4, seed=0, loc=0.0, scale=1.0) -> np.ndarray:
    return (loc + scale * np.random.default_rng(seed).standard_normal((n, c))).astype(np.float32)


def _normalised(x: np.ndarray, mean, var, eps=1e-5) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 - mean) / np.sqrt(var + eps)


@spec("bn.train.normalises_with_batch_mean_and_biased_variance")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_training_normalises_with_the_batch_mean_and_the_biased_batch_variance(fw):
    x = _x()
    y = BN(fw, 4)(x, train=True)
    expected = _normalised(x, x.astype(np.float64).mean(0), x.astype(np.float64).var(0, ddof=0))
    np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)


@spec("bn.running_mean.momentum_convention")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_running_mean_moves_10_percent_towards_the_batch_with_torch_0_1_and_flax_0_9(fw):
    """torch: new = (1 - 0.1) * old + 0.1 * batch; Flax with momentum=0.9: new = 0.9 * old + 0.1 * batch."""
    x = _x()
    bn = BN(fw, 4, momentum=0.1)  # converted to Flax's 0.9 for linen and nnx
    old = np.full(4, 0.5, np.float32)
    bn.set_stats(old, np.ones(4, np.float32))
    bn(x, train=True)
    np.testing.assert_allclose(bn.stats["mean"], 0.9 * old + 0.1 * x.mean(0), rtol=RTOL, atol=ATOL)


@spec("bn.running_var.unbiased_in_torch_biased_in_flax")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_running_var_update_uses_the_unbiased_variance_in_torch_and_the_biased_one_in_flax(fw):
    """The batch term differs by exactly n / (n - 1) (pytorch#1410, #77427)."""
    n = 16
    x = _x(n=n)
    bn = BN(fw, 4)
    bn(x, train=True)
    ddof = 1 if fw == "torch" else 0
    np.testing.assert_allclose(bn.stats["var"], 0.9 * 1.0 + 0.1 * x.var(0, ddof=ddof), rtol=RTOL, atol=ATOL)


@spec("bn.running_var.batch_terms_ratio_is_n_over_n_minus_1", framework="cross")
def test_the_running_var_batch_terms_of_torch_and_flax_differ_by_n_over_n_minus_1():
    n = 8
    x = _x(n=n, seed=3)
    torch_bn, flax_bn = BN("torch", 4), BN("linen", 4)
    torch_bn(x, train=True), flax_bn(x, train=True)
    ratio = (torch_bn.stats["var"] - 0.9) / (flax_bn.stats["var"] - 0.9)
    np.testing.assert_allclose(ratio, n / (n - 1), rtol=1e-5, atol=0)  # measured 2e-7 relative


@spec("bn.eps.default_1e-5_inside_the_square_root")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_default_epsilon_is_1e_5_and_enters_inside_the_square_root(fw):
    defaults = {
        "torch": torch.nn.BatchNorm1d(4).eps,
        "linen": nn.BatchNorm().epsilon,
        "nnx": nnx.BatchNorm(4, rngs=nnx.Rngs(0)).epsilon,
    }
    assert defaults[fw] == 1e-5
    x = np.zeros((4, 1), np.float32)
    x[0] = 1.0  # batch mean 0.25, biased var 0.1875
    eps = 0.5  # large, so that "inside" and "outside" the root differ clearly
    y = BN(fw, 1, eps=eps)(x, train=True)
    np.testing.assert_allclose(y[0, 0], 0.75 / np.sqrt(0.1875 + eps), rtol=RTOL, atol=ATOL)


@spec("bn.momentum.flax_default_is_0.99", framework="cross")
def test_flax_default_momentum_is_0_99_not_0_9_and_torch_default_is_0_1():
    """Flax's porting guide says 0.9; the code says 0.99 (a torch port must pass 0.9)."""
    assert torch.nn.BatchNorm1d(4).momentum == 0.1
    assert nn.BatchNorm().momentum == 0.99
    assert nnx.BatchNorm(4, rngs=nnx.Rngs(0)).momentum == 0.99


@spec("bn.fast_variance.loses_precision_on_large_means")
@pytest.mark.parametrize("fw", ["linen", "nnx"])
def test_flax_fast_variance_loses_precision_on_a_large_mean_and_two_pass_fixes_it(fw):
    """Flax's default use_fast_variance=True computes E[x^2] - E[x]^2 in float32: with
    mean 1000 and spread 0.01 that cancels catastrophically. Each side is compared with a
    float64 normalisation of the same float32 values. A float32 two-pass mean of n values
    near |mean| errs by about sqrt(n) * eps32 * |mean|, so the normalised output may err by
    sqrt(n) * eps32 * |mean| / std = 8 * 1.2e-7 * 1e5 ~ 0.1: that is the bound for torch and
    for two-pass Flax (measured 2.6e-3 to 2.2e-2, depending on torch's thread count); the
    fast variance is off by more than 0.5 (measured 1.2 to 6.6)."""
    x = _x(n=64, loc=1000.0, scale=0.01, seed=1)
    reference = _normalised(x, x.astype(np.float64).mean(0), x.astype(np.float64).var(0))
    bound = np.sqrt(len(x)) * np.finfo(np.float32).eps * 1000.0 / 0.01
    fast = BN(fw, 4)(x, train=True)
    two_pass = BN(fw, 4, use_fast_variance=False)(x, train=True)
    torch_y = BN("torch", 4)(x, train=True)
    assert np.max(np.abs(fast - reference)) > 0.5
    assert np.max(np.abs(two_pass - reference)) < bound
    assert np.max(np.abs(torch_y - reference)) < bound


@spec("bn.fast_variance.ported_models_use_two_pass", framework="nnx")
def test_the_ported_flax_models_use_two_pass_variance():
    spec_ = registry.get("cnn")
    model = spec_.build_nnx(nnx.Rngs(0))
    assert all(not bn.use_fast_variance for bn in [model.bn1, model.bn2, model.fc_bn])


@spec("bn.init.scale_1_bias_0_mean_0_var_1")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_default_initialisation_is_scale_1_bias_0_mean_0_var_1(fw):
    bn = BN(fw, 3)
    if fw == "torch":
        scale, bias = bn.layer.weight.detach().numpy(), bn.layer.bias.detach().numpy()
    elif fw == "linen":
        scale, bias = bn.variables["params"]["scale"], bn.variables["params"]["bias"]
    else:
        scale, bias = bn.layer.scale[...], bn.layer.bias[...]
    for value, expected in [(scale, 1), (bias, 0), (bn.stats["mean"], 0), (bn.stats["var"], 1)]:
        np.testing.assert_array_equal(value, np.full(3, expected, np.float32))


@spec("bn.eval.fixed_affine_map_no_update")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_eval_uses_the_running_statistics_and_updates_nothing(fw):
    """BatchNorm in inference is a fixed affine map, not switched off."""
    bn = BN(fw, 4)
    mean, var = np.array([1.0, -2.0, 0.5, 0.0], np.float32), np.array([4.0, 0.25, 1.0, 9.0], np.float32)
    bn.set_stats(mean, var)
    before = bn.stats
    x = _x()
    y = bn(x, train=False)
    np.testing.assert_allclose(y, _normalised(x, mean, var), rtol=RTOL, atol=ATOL)
    for key, value in bn.stats.items():
        np.testing.assert_array_equal(value, before[key])
    y_single = bn(x[:1], train=False)  # a fixed map: one sample gives the same as in the batch
    np.testing.assert_array_equal(y_single, y[:1])


@spec("bn.mutable.torch_buffers_in_place", framework="torch")
def test_torch_train_forward_changes_the_buffers_in_place():
    layer = torch.nn.BatchNorm1d(4)
    buffer = layer.running_mean
    layer(torch.from_numpy(_x()))
    assert layer.running_mean is buffer and not torch.equal(buffer, torch.zeros(4))
    assert int(layer.num_batches_tracked) == 1


@spec("bn.mutable.linen_returns_updates_with_mutable", framework="linen")
def test_linen_returns_updated_batch_stats_only_when_mutable_is_passed():
    layer = nn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = layer.init(jax.random.key(0), jnp.zeros((2, 4)))
    _y, updates = layer.apply(variables, _x(), mutable=["batch_stats"])
    assert set(updates) == {"batch_stats"}
    assert not np.allclose(updates["batch_stats"]["mean"], 0)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))  # the input is not touched


@spec("bn.mutable.linen_raises_without_mutable", framework="linen")
def test_linen_training_without_mutable_raises_modify_scope_variable_error():
    layer = nn.BatchNorm(use_running_average=False)
    variables = layer.init(jax.random.key(0), jnp.zeros((2, 4)))
    with pytest.raises(flax.errors.ModifyScopeVariableError, match='collection "batch_stats" is immutable'):
        layer.apply(variables, _x())


@spec("bn.mutable.linen_init_does_not_update", framework="linen")
def test_linen_init_does_not_update_the_statistics():
    variables = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), _x(loc=5.0))
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))


@spec("bn.mutable.nnx_batchstat_in_place_and_mode_switch", framework="nnx")
def test_nnx_updates_batch_stat_variables_in_place_and_train_eval_switch_the_mode():
    layer = nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    assert layer.use_running_average is False  # nnx layers start in training mode
    layer(jnp.asarray(_x()))
    trained = np.asarray(layer.mean[...])
    assert not np.allclose(trained, 0)
    layer.eval()
    assert layer.use_running_average is True
    layer(jnp.asarray(_x(seed=5)))
    np.testing.assert_array_equal(layer.mean[...], trained)
    layer.train()
    assert layer.use_running_average is False


@spec("bn.mutable.nnx_updates_survive_nnx_jit", framework="nnx")
def test_nnx_state_updates_survive_nnx_jit():
    layer = nnx.BatchNorm(4, momentum=0.9, rngs=nnx.Rngs(0))
    x = jnp.asarray(_x())
    nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_allclose(layer.mean[...], 0.1 * np.asarray(x).mean(0), rtol=RTOL, atol=ATOL)


@spec("bn.mutable.linen_jit_update_is_returned_not_applied", framework="linen")
def test_a_linen_update_made_inside_jax_jit_is_returned_not_applied():
    layer = nn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = layer.init(jax.random.key(0), jnp.zeros((2, 4)))

    @jax.jit
    def step(variables, x):
        return layer.apply(variables, x, mutable=["batch_stats"])

    _, updates = step(variables, jnp.asarray(_x()))
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * _x().mean(0), rtol=RTOL, atol=ATOL)


@spec("bn.torch.momentum_none_is_cumulative_average", framework="torch")
def test_torch_momentum_none_is_the_cumulative_average_over_num_batches_tracked():
    layer = torch.nn.BatchNorm1d(4, momentum=None)
    batches = [_x(seed=s) for s in range(5)]
    for b in batches:
        layer(torch.from_numpy(b))
    assert int(layer.num_batches_tracked) == 5
    np.testing.assert_allclose(layer.running_mean, np.mean([b.mean(0) for b in batches], 0), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.running_var, np.mean([b.var(0, ddof=1) for b in batches], 0), rtol=RTOL, atol=ATOL)


@spec("bn.torch.track_running_stats_false_uses_batch_stats_in_eval", framework="torch")
def test_torch_track_running_stats_false_keeps_no_buffers_and_uses_batch_statistics_in_eval_too():
    layer = torch.nn.BatchNorm1d(4, track_running_stats=False).eval()
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = _x()
    with torch.no_grad():
        y = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y, _normalised(x, x.mean(0), x.var(0)), rtol=RTOL, atol=ATOL)
    # only the constructor argument counts: set later, the attribute leaves eval on the stale buffers
    later = torch.nn.BatchNorm1d(4)
    with torch.no_grad():
        later.train()(torch.from_numpy(_x(seed=3)))
        later.track_running_stats = False
        y = later.eval()(torch.from_numpy(x)).numpy()
    stale = _normalised(x, later.running_mean.numpy(), later.running_var.numpy())
    np.testing.assert_allclose(y, stale, rtol=RTOL, atol=ATOL)
    assert np.max(np.abs(y - _normalised(x, x.mean(0), x.var(0)))) > 0.1  # and not the batch statistics


@spec("bn.affine_false_has_no_scale_or_bias")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_affine_false_normalises_without_scale_or_bias(fw):
    if fw == "torch":
        layer = torch.nn.BatchNorm1d(4, affine=False)
        assert list(layer.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
        bn = None
    else:
        bn = BN(fw, 4, use_scale=False, use_bias=False)
        names = (
            bn.variables.get("params", {})
            if fw == "linen"
            else {k: 1 for k in ("scale", "bias") if getattr(bn.layer, k) is not None}
        )
        assert not names
    x = _x()
    if bn is None:
        with torch.no_grad():
            y = layer(torch.from_numpy(x)).numpy()
    else:
        y = bn(x, train=True)
    np.testing.assert_allclose(y, _normalised(x, x.mean(0), x.var(0)), rtol=RTOL, atol=ATOL)


@spec("bn.batch_size_one.torch_raises_flax_returns_bias")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_a_batch_of_one_in_training_raises_in_torch_and_returns_the_bias_in_flax(fw):
    x = np.array([[1.0, 2.0, -3.0]], np.float32)
    bn = BN(fw, 3)
    if fw == "torch":
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            bn(x, train=True)
        return
    y = bn(x, train=True)
    np.testing.assert_array_equal(y, np.zeros((1, 3), np.float32))  # (x - x) * ... + bias, bias = 0
    np.testing.assert_allclose(bn.stats["var"], np.full(3, 0.9), rtol=1e-6, atol=0)  # var decays towards 0


@spec("bn.empty_batch.torch_counts_stock_flax_nan")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_an_empty_batch_leaves_torch_statistics_alone_but_turns_stock_flax_ones_into_nan(fw):
    bn = BN(fw, 3)
    y = bn(np.zeros((0, 3), np.float32), train=True)
    assert y.shape == (0, 3)
    if fw == "torch":
        np.testing.assert_array_equal(bn.stats["mean"], np.zeros(3))
        assert bn.stats["count"] == 1  # the empty batch is counted
    else:
        assert np.isnan(bn.stats["mean"]).all() and np.isnan(bn.stats["var"]).all()


@spec("bn.eps_nonpositive.torch_raises_flax_does_not_check")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_a_non_positive_epsilon_raises_in_torch_and_is_not_checked_in_flax(fw):
    bn = BN(fw, 4, eps=0.0)
    if fw == "torch":
        with pytest.raises(ValueError, match="batch_norm eps must be positive during training, but got 0.0"):
            bn(_x(), train=True)
    else:
        assert np.isfinite(bn(_x(), train=True)).all()


@spec("bn.zero_variance_channel_outputs_the_bias_up_to_amplified_rounding")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_a_constant_channel_outputs_the_bias_up_to_rounding_amplified_by_one_over_sqrt_eps(fw):
    """x - mean is 0 up to the rounding of the mean, which 1/sqrt(eps) = 316 amplifies:
    for a channel of 3.25 torch gives -3.8e-5, Flax exactly 0 (its mean is exact here)."""
    c = 3.25
    x = _x()
    x[:, 2] = c
    y = BN(fw, 4)(x, train=True)[:, 2]
    assert np.all(y == y[0])  # one value for the whole channel
    bound = abs(c) * 4 * np.finfo(np.float32).eps / np.sqrt(1e-5)  # 4 ulp of c, amplified: 4.9e-4
    assert abs(float(y[0])) <= bound
    if fw != "torch":
        assert y[0] == 0.0


@spec("bn.nan_in_one_sample_poisons_the_channel_in_training")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_nan_in_one_sample_poisons_its_channel_for_the_whole_batch_in_training_only(fw):
    x = _x()
    x[0, 1] = np.nan
    bn = BN(fw, 4)
    y = bn(x, train=True)
    assert np.isnan(y[:, 1]).all() and np.isfinite(np.delete(y, 1, axis=1)).all()
    assert np.isnan(bn.stats["mean"][1]) and np.isfinite(np.delete(bn.stats["mean"], 1)).all()
    fresh = BN(fw, 4)
    y_eval = fresh(x, train=False)  # eval: a fixed map, NaN stays in its own element
    assert np.isnan(y_eval[0, 1]) and np.isnan(y_eval).sum() == 1


def _bn_input_grad(fw: str, x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """d(sum(g * bn(x))) / dx in training mode."""
    if fw == "torch":
        xt = torch.from_numpy(x).requires_grad_(True)
        (torch.nn.BatchNorm1d(x.shape[1])(xt) * torch.from_numpy(g)).sum().backward()
        return xt.grad.numpy()
    if fw == "linen":
        layer = nn.BatchNorm(use_running_average=False)
        variables = layer.init(jax.random.key(0), x)

        def f(x):
            return jnp.sum(layer.apply(variables, x, mutable=["batch_stats"])[0] * g)

        return np.asarray(jax.grad(f)(jnp.asarray(x)))
    layer = nnx.BatchNorm(x.shape[1], rngs=nnx.Rngs(0))
    return np.asarray(nnx.grad(lambda layer, x: jnp.sum(layer(x) * g), argnums=1)(layer, jnp.asarray(x)))


@spec("bn.grad_flows_through_batch_statistics")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_gradients_flow_through_the_batch_statistics_in_training(fw):
    """dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps): not just g / sqrt(var + eps)."""
    x, g = _x(n=8, seed=2).astype(np.float32), _x(n=8, seed=3)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    mean, var = x64.mean(0), x64.var(0)
    xhat = (x64 - mean) / np.sqrt(var + 1e-5)
    expected = (g64 - g64.mean(0) - xhat * (g64 * xhat).mean(0)) / np.sqrt(var + 1e-5)
    got = _bn_input_grad(fw, x, g)
    # float32 backward; measured max |diff| 6e-7 against the float64 formula
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(got - g64 / np.sqrt(var + 1e-5))) > 0.1  # the statistics' terms matter
