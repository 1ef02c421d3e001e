"""flaxbn's BatchNorm layers: the stock Flax statistics with a counter and an empty-batch
guard (``bn_semantics="flax"``), and torch's statistics (``bn_semantics="torch"``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from frameworks import BN

import flaxbn

spec = pytest.mark.spec
FLAX_APIS = ["linen", "nnx"]
# Running statistics after a few float32 updates: measured max |torch - flaxbn| 1.2e-7.
RTOL, ATOL = 1e-6, 1e-6


def _batches(shape, k=4):
    rng = np.random.default_rng(0)
    return [(2.0 + 3.0 * rng.standard_normal(shape)).astype(np.float32) for _ in range(k)]


@spec("bn.flaxbn_torch.matches_torch_statistics")
@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["m0.1", "m0.3", "cumulative"])
@pytest.mark.parametrize("shape", [(8, 3), (4, 5, 5, 3)], ids=["NC", "NHWC"])
@pytest.mark.parametrize("api", FLAX_APIS)
def test_torch_semantics_follow_torch_running_statistics_and_counter_step_by_step(api, shape, momentum):
    torch_bn = BN("torch", 3, momentum=momentum)
    flax_bn = BN(api, 3, momentum=momentum, flaxbn_semantics="torch")
    for x in _batches(shape):
        np.testing.assert_allclose(flax_bn(x, train=True), torch_bn(x, train=True), rtol=1e-5, atol=1e-5)
        for key in ("mean", "var"):
            np.testing.assert_allclose(flax_bn.stats[key], torch_bn.stats[key], rtol=RTOL, atol=ATOL, err_msg=key)
        assert flax_bn.stats["count"] == torch_bn.stats["count"]
    x = _batches(shape, 1)[0]
    np.testing.assert_allclose(flax_bn(x, train=False), torch_bn(x, train=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("api", FLAX_APIS)
def test_torch_semantics_without_running_stats_use_batch_statistics_in_eval(api):
    x = _batches((8, 3), 1)[0]
    if api == "linen":
        layer = flaxbn.LinenTorchBatchNorm(track_running_stats=False)
        variables = layer.init(jax.random.key(0), x, use_running_average=True)
        assert "batch_stats" not in variables
        y = layer.apply(variables, x, use_running_average=True)
    else:
        layer = flaxbn.NnxTorchBatchNorm(3, track_running_stats=False)
        layer.eval()
        assert not nnx.state(layer, nnx.BatchStat)
        y = layer(jnp.asarray(x))
    expected = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("api", FLAX_APIS)
def test_torch_semantics_raise_like_torch_on_a_batch_of_one_and_on_eps_zero(api):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        BN(api, 3, flaxbn_semantics="torch")(np.ones((1, 3), np.float32), train=True)
    with pytest.raises(ValueError, match="batch_norm eps must be positive during training, but got 0.0"):
        BN(api, 3, eps=0.0, flaxbn_semantics="torch")(np.ones((4, 3), np.float32), train=True)


@pytest.mark.parametrize("api", FLAX_APIS)
def test_without_running_stats_eval_uses_batch_statistics_so_it_raises_like_torch(api):
    """torch's track_running_stats=False normalises with the batch in eval too, with its
    training checks: one value per channel and eps <= 0 raise there; flaxbn does the same."""
    torch_bn = torch.nn.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        torch_bn(torch.ones(1, 3))
    one = np.ones((1, 3), np.float32)
    if api == "linen":
        layer = flaxbn.LinenTorchBatchNorm(track_running_stats=False)
        variables = layer.init(jax.random.key(0), np.ones((4, 3), np.float32), use_running_average=True)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            layer.apply(variables, one, use_running_average=True)
        with pytest.raises(ValueError, match="batch_norm eps must be positive during training, but got 0.0"):
            flaxbn.LinenTorchBatchNorm(track_running_stats=False, epsilon=0.0).apply(
                variables, np.ones((4, 3), np.float32), use_running_average=True
            )
    else:
        layer = flaxbn.NnxTorchBatchNorm(3, track_running_stats=False)
        layer.eval()
        with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
            layer(jnp.asarray(one))
        layer = flaxbn.NnxTorchBatchNorm(3, track_running_stats=False, epsilon=0.0)
        layer.eval()
        with pytest.raises(ValueError, match="batch_norm eps must be positive during training, but got 0.0"):
            layer(jnp.ones((4, 3)))


@pytest.mark.parametrize("api", FLAX_APIS)
def test_the_cumulative_average_follows_torch_exactly_in_float64(api):
    """momentum=None: the factor 1/count is taken in the statistics' dtype, so in float64
    the running statistics equal torch's to rounding (measured <= 2e-16 relative; with the
    factor in float32 they drifted 3e-8)."""
    batches = [b.astype(np.float64) for b in _batches((8, 3), k=6)]
    torch_bn = torch.nn.BatchNorm1d(3, momentum=None).double().train()
    with torch.no_grad():
        for x in batches:
            torch_bn(torch.from_numpy(x))
    with jax.enable_x64(True):
        f64 = {"mean": jnp.zeros(3, jnp.float64), "var": jnp.ones(3, jnp.float64)}
        if api == "linen":
            layer = flaxbn.LinenTorchBatchNorm(momentum=None)
            variables = layer.init(jax.random.key(0), jnp.ones((2, 3)), use_running_average=True)
            variables = {**variables, "batch_stats": {**variables["batch_stats"], **f64}}
            for x in batches:
                _, upd = layer.apply(variables, jnp.asarray(x), use_running_average=False, mutable=["batch_stats"])
                variables = {**variables, **upd}
            got = {k: np.asarray(variables["batch_stats"][k]) for k in f64}
        else:
            layer = flaxbn.NnxTorchBatchNorm(3, momentum=None)
            layer.mean, layer.var = nnx.BatchStat(f64["mean"]), nnx.BatchStat(f64["var"])
            for x in batches:
                layer(jnp.asarray(x))
            got = {"mean": np.asarray(layer.mean[...]), "var": np.asarray(layer.var[...])}
    assert got["mean"].dtype == np.float64
    np.testing.assert_allclose(got["mean"], torch_bn.running_mean.numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(got["var"], torch_bn.running_var.numpy(), rtol=1e-13, atol=0)


@spec("bn.empty_batch.flaxbn_guards")
@pytest.mark.parametrize("semantics", ["flax", "torch"])
@pytest.mark.parametrize("api", FLAX_APIS)
def test_flaxbn_leaves_statistics_alone_on_an_empty_batch_and_counts_it_like_torch(api, semantics):
    bn = BN(api, 3, flaxbn_semantics=semantics)
    y = bn(np.zeros((0, 3), np.float32), train=True)
    assert y.shape == (0, 3)
    np.testing.assert_array_equal(bn.stats["mean"], np.zeros(3))
    np.testing.assert_array_equal(bn.stats["var"], np.ones(3))
    assert bn.stats["count"] == 1


@pytest.mark.parametrize("api", FLAX_APIS)
def test_flax_semantics_keep_stock_statistics_and_count_training_batches_only(api):
    stock, ours = BN(api, 3, use_fast_variance=False), BN(api, 3, flaxbn_semantics="flax")
    for x in _batches((8, 3)):
        np.testing.assert_array_equal(ours(x, train=True), stock(x, train=True))
    ours(x, train=False)
    for key in ("mean", "var"):
        np.testing.assert_array_equal(ours.stats[key], stock.stats[key])
    assert ours.stats["count"] == 4


def test_flax_config_refuses_cumulative_momentum_without_torch_semantics():
    with pytest.raises(ValueError, match="bn_momentum=None \\(cumulative average\\) needs bn_semantics='torch'"):
        flaxbn.MLPConfig(bn_momentum=None)
    assert flaxbn.MLPConfig(bn_momentum=None, bn_semantics="torch").bn_momentum is None
