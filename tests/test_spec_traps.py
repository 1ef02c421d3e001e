"""Traps users of both frameworks report again and again, each checked on the installed
versions: state that changes when you think it does not, randomness that repeats or moves,
dtypes, axes and optimizer conventions that differ silently."""

from __future__ import annotations

import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import linen as nn
from flax import nnx

spec = pytest.mark.spec


@spec("bn.torch.statistics_update_under_no_grad_and_frozen_parameters", framework="torch")
def test_torch_running_statistics_update_under_no_grad_and_with_frozen_parameters():
    """Only ``.eval()`` stops the update: ``torch.no_grad()`` and ``requires_grad_(False)``
    (a "frozen" backbone) do not (pytorch forums: "BatchNorm stats change in a frozen model")."""
    bn = torch.nn.BatchNorm1d(3).train()
    for p in bn.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        bn(torch.randn(8, 3) + 5.0)
    assert int(bn.num_batches_tracked) == 1 and float(bn.running_mean.min()) > 0.3  # 0.1 * ~5
    before = bn.running_mean.clone()
    with torch.no_grad():
        bn.eval()(torch.randn(8, 3) + 5.0)
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 1


@spec("dropout.torch.dropout2d_on_3d_input_is_channelwise_1d", framework="torch")
def test_torch_dropout2d_on_a_3d_input_warns_and_drops_whole_channels_of_a_1d_map():
    """(N, C, L) is taken as batched 1-D maps: one draw per (sample, channel), constant over L."""
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.nn.Dropout2d(0.5).train()(torch.ones(4, 6, 10))
    assert any("Received a 3D input to dropout2d" in str(w.message) for w in caught)
    assert bool((y == y[:, :, :1]).all()) and not bool((y == y[:, :1, :]).all())


@spec("rng.jax.threefry_partitionable_changes_the_masks", framework="cross")
def test_the_same_key_draws_another_mask_when_jax_threefry_partitionable_changes():
    """The flag changes how random bits are generated (its default flipped from False to True,
    jax discussion #18480):
    a saved key does not reproduce its dropout masks across that setting (it is recorded in
    every results.json's meta.jax_config)."""
    key = jax.random.key(0)
    flag = jax.config.jax_threefry_partitionable
    a = jax.random.bernoulli(key, 0.5, (64,))
    try:
        jax.config.update("jax_threefry_partitionable", not flag)
        b = jax.random.bernoulli(key, 0.5, (64,))
    finally:
        jax.config.update("jax_threefry_partitionable", flag)
    assert not np.array_equal(a, b)


@spec("optim.rmsprop_defaults_differ", framework="cross")
def test_rmsprop_defaults_differ_and_match_once_decay_and_eps_placement_are_torchs():
    """torch: alpha 0.99, eps 1e-8 outside the root; optax: decay 0.9, eps 1e-8 inside the
    root (``eps_in_sqrt=True``). One step from the same point differs; with
    ``decay=0.99, eps_in_sqrt=False`` it matches (float32: measured exact)."""
    p0, g = np.array([1.0, -2.0], np.float32), np.array([0.5, 0.1], np.float32)
    t = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.RMSprop([t], lr=0.01)
    t.grad = torch.tensor(g)
    opt.step()
    assert (opt.defaults["alpha"], opt.defaults["eps"]) == (0.99, 1e-8)

    def optax_step(tx):
        update, _ = tx.update(jnp.asarray(g), tx.init(jnp.asarray(p0)))
        return np.asarray(jnp.asarray(p0) + update)

    assert np.max(np.abs(optax_step(optax.rmsprop(0.01)) - t.detach().numpy())) > 1e-2
    np.testing.assert_allclose(
        optax_step(optax.rmsprop(0.01, decay=0.99, eps=1e-8, eps_in_sqrt=False)),
        t.detach().numpy(),
        rtol=1e-6,
        atol=1e-7,
    )


@spec("optim.torch_sgd_dampening_skipped_on_the_first_step", framework="torch")
def test_torch_sgd_dampening_is_not_applied_on_the_first_step():
    """``buf = g`` on the first step, then ``buf = momentum * buf + (1 - dampening) * g``."""
    g = torch.tensor([0.5, 0.1])
    t = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([t], lr=0.1, momentum=0.9, dampening=0.5)
    bufs = []
    for _ in range(2):
        t.grad = g.clone()
        opt.step()
        bufs.append(opt.state[t]["momentum_buffer"].clone())
    torch.testing.assert_close(bufs[0], g, rtol=0, atol=0)
    torch.testing.assert_close(bufs[1], 0.9 * g + 0.5 * g, rtol=1e-6, atol=0)


@spec("bn.linen.nchw_input_normalises_the_last_axis", framework="linen")
def test_linen_batchnorm_on_an_nchw_input_normalises_the_last_axis_unless_axis_is_1():
    """A ported NCHW tensor fed to linen BatchNorm keeps statistics per *width* column."""
    x = jnp.ones((4, 3, 5, 7))
    assert nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)["batch_stats"]["mean"].shape == (7,)
    layer = nn.BatchNorm(use_running_average=False, axis=1)
    assert layer.init(jax.random.key(0), x)["batch_stats"]["mean"].shape == (3,)


@spec("bn.linen.use_running_average_given_exactly_once", framework="linen")
def test_linen_use_running_average_must_be_given_exactly_once():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="passed to the constructor and at call time"):
        nn.BatchNorm(use_running_average=True).init(jax.random.key(0), x, use_running_average=True)
    with pytest.raises(ValueError, match="must be passed to the constructor or at call time"):
        nn.BatchNorm().init(jax.random.key(0), x)


@spec("bn.mixed_precision_output_and_statistics_dtypes", framework="cross")
def test_in_mixed_precision_flax_returns_float32_and_torch_keeps_the_input_dtype_even_under_autocast():
    """Flax BatchNorm with ``dtype=None`` on bfloat16 input returns float32 and keeps float32
    statistics. torch's autocast does not recast BatchNorm (it is on no autocast list): the
    output has the input's dtype, float32 in gives float32 out under autocast, and bfloat16
    comes out only when the input is bfloat16 (after an autocast Linear or conv); the
    statistics stay float32. A module cast with ``.to(torch.bfloat16)`` keeps bfloat16
    statistics.

    Catches: autocast casting BatchNorm's output to the autocast dtype."""
    xb = jnp.arange(12, dtype=jnp.bfloat16).reshape(4, 3)
    y, variables = nn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), xb)
    assert y.dtype == jnp.float32 and variables["batch_stats"]["mean"].dtype == jnp.float32
    x32 = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    bn, linear = torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bn(x32).dtype == torch.float32  # float32 in, float32 out, autocast or not
        assert bn(x32.to(torch.bfloat16)).dtype == torch.bfloat16
        h = linear(x32)
        assert h.dtype == torch.bfloat16 and bn(h).dtype == torch.bfloat16  # after an autocast layer
    assert bn.running_mean.dtype == torch.float32
    cast = torch.nn.BatchNorm1d(3).to(torch.bfloat16)
    assert cast(x32.to(torch.bfloat16)).dtype == torch.bfloat16 and cast.running_mean.dtype == torch.bfloat16


@spec("dropout.nnx.falls_back_to_the_default_stream", framework="nnx")
def test_nnx_dropout_without_a_dropout_stream_draws_from_default_and_reseeding_dropout_misses_it():
    """``nnx.Dropout(rngs=nnx.Rngs(0))`` has no ``dropout`` stream: it forks ``default``.
    ``nnx.reseed(model, dropout=...)`` then changes nothing - the layer draws what an
    untouched twin draws; ``nnx.reseed(model, default=...)`` is what reseeds it.

    Catches: reseed(dropout=) also reseeding the default stream."""
    layer, twin = nnx.Dropout(0.5, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(0))
    assert [v.tag for _, v in nnx.to_flat_state(nnx.state(layer, nnx.RngKey))] == ["default"]
    x = jnp.ones((64,))
    nnx.reseed(layer, dropout=1)
    np.testing.assert_array_equal(layer(x), twin(x))  # as if never reseeded
    nnx.reseed(layer, default=1)
    assert not np.array_equal(layer(x), nnx.Dropout(0.5, rngs=nnx.Rngs(0))(x))  # now it is


@spec("cross.gelu_default_is_approximate_in_flax", framework="cross")
def test_gelu_is_exact_in_torch_and_the_tanh_approximation_in_flax_by_default():
    """``torch.nn.GELU()`` uses erf; ``nn.gelu``/``jax.nn.gelu`` default to the tanh
    approximation: measured 4.4e-4 apart on [-3, 3]; ``approximate=False`` agrees (5e-7)."""
    x = np.linspace(-3, 3, 13).astype(np.float32)
    exact = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert torch.nn.GELU().approximate == "none"
    assert np.max(np.abs(np.asarray(nn.gelu(jnp.asarray(x))) - exact)) > 1e-4
    np.testing.assert_allclose(np.asarray(nn.gelu(jnp.asarray(x), approximate=False)), exact, rtol=1e-5, atol=1e-6)


@spec("cross.layernorm_epsilon_defaults", framework="cross")
def test_layernorm_epsilon_is_1e_5_in_torch_and_1e_6_in_flax():
    assert torch.nn.LayerNorm(4).eps == 1e-5
    assert nn.LayerNorm().epsilon == 1e-6 and nnx.LayerNorm(4, rngs=nnx.Rngs(0)).epsilon == 1e-6


@spec("cross.linear_default_initialisation_differs", framework="cross")
def test_default_linear_initialisations_differ():
    """torch: weight and bias uniform in +-1/sqrt(fan_in) (std 1/sqrt(3 fan_in)); Flax:
    truncated-normal LeCun weights (std 1/sqrt(fan_in)) and zero bias. Transferred weights
    make this moot; models trained from scratch start differently (measured std 0.0183 vs 0.0317)."""
    torch.manual_seed(0)
    t = torch.nn.Linear(1000, 1000)
    params = nn.Dense(1000).init(jax.random.key(0), jnp.ones((1, 1000)))["params"]
    w, k = t.weight.detach().numpy(), np.asarray(params["kernel"])
    assert abs(w.std() - 1 / np.sqrt(3000)) < 1e-3 and np.abs(w).max() <= 1 / np.sqrt(1000)
    assert abs(k.std() - 1 / np.sqrt(1000)) < 1e-3 and np.abs(k).max() > 1 / np.sqrt(1000)
    assert t.bias.detach().abs().max() > 0 and not np.any(np.asarray(params["bias"]))


@spec("cross.avg_pool_counts_the_padding_by_default", framework="cross")
def test_average_pooling_counts_the_padding_in_both_by_default():
    """torch ``AvgPool2d(count_include_pad=True)`` and Flax ``avg_pool(count_include_pad=True)``
    agree: a padded corner of a 3x3 window averages 4 values over 9."""
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    want = torch.nn.AvgPool2d(3, stride=1, padding=1)(torch.from_numpy(x)).numpy()[0, 0]
    got = nn.avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    np.testing.assert_allclose(np.asarray(got)[0, :, :, 0], want, rtol=1e-6, atol=1e-6)
    assert abs(want[0, 0] - (0 + 1 + 4 + 5) / 9) < 1e-6


@spec("dropout.linen.vmap_without_split_rngs_repeats_the_mask", framework="linen")
def test_linen_vmap_raises_without_dropout_in_split_rngs_and_repeats_the_mask_with_split_false():
    """``nn.vmap`` hands the mapped module only the rng streams named in ``split_rngs``:
    leaving ``"dropout"`` out raises ``InvalidRngError`` (the mapped Dropout finds no
    stream). ``split_rngs={"dropout": False}`` passes one key to every member, which then all
    draw the same mask; ``{"dropout": True}`` splits it, one mask each (google/flax#4973).

    Catches: vmap passing unnamed streams through unsplit; vmap splitting a stream given
    False."""

    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5, deterministic=False)(x)

    x, key = jnp.ones((4, 64)), jax.random.key(0)
    with pytest.raises(flax.errors.InvalidRngError, match='needs PRNG for "dropout"'):
        nn.vmap(Drop, variable_axes={}, split_rngs={"params": True})().apply({}, x, rngs={"dropout": key})
    same = nn.vmap(Drop, variable_axes={}, split_rngs={"dropout": False})().apply({}, x, rngs={"dropout": key})
    split = nn.vmap(Drop, variable_axes={}, split_rngs={"dropout": True})().apply({}, x, rngs={"dropout": key})
    assert bool((same == same[0]).all()) and not bool((split == split[0]).all())


@spec("dropout.linen.deterministic_given_exactly_once", framework="linen")
def test_linen_dropout_deterministic_must_be_given_exactly_once():
    with pytest.raises(ValueError, match="passed to the constructor and at call time"):
        nn.Dropout(0.5, deterministic=True).apply({}, jnp.ones(4), deterministic=True)


@spec("optim.adam_defaults_agree", framework="cross")
def test_adam_defaults_agree_and_one_step_matches():
    """betas (0.9, 0.999), eps 1e-8 added outside the root in both: three steps from the
    same point agree to float32 rounding (measured 2.4e-7 on values near 1)."""
    p0, grads = (
        np.array([1.0, -2.0, 0.5], np.float32),
        [np.array(g, np.float32) for g in ([0.5, 0.1, -3.0], [0.2, -0.4, 1.0], [1e-3, 2.0, 0.0])],
    )
    t = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.Adam([t], lr=0.01)
    tx = optax.adam(0.01)
    p, state = jnp.asarray(p0), tx.init(jnp.asarray(p0))
    for g in grads:
        t.grad = torch.tensor(g)
        opt.step()
        update, state = tx.update(jnp.asarray(g), state, p)
        p = p + update
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    np.testing.assert_allclose(np.asarray(p), t.detach().numpy(), rtol=1e-6, atol=1e-6)


@spec("bn.nnx.vmap_over_a_shared_train_batchnorm_raises", framework="nnx")
def test_nnx_vmap_over_a_shared_batchnorm_in_training_raises():
    """Broadcasting one train-mode BatchNorm into ``nnx.vmap`` (``in_axes=None``) would give
    every member its own statistics for one shared variable: nnx refuses the batched state."""
    bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 8, 3)) * jnp.arange(4.0)[:, None, None]
    with pytest.raises(ValueError, match="(?i)axis"):
        nnx.vmap(lambda m, x: m(x), in_axes=(None, 0))(bn, x)


@spec("bn.linen.vmap_needs_variable_axes_for_batch_stats", framework="linen")
def test_linen_vmap_over_batchnorm_needs_variable_axes_for_batch_stats():
    """Without ``variable_axes={"batch_stats": 0}`` the vmapped BatchNorm finds no statistics
    collection; with it each member keeps its own (leading axis)."""
    from flax.errors import ScopeCollectionNotFound

    class Norm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(x)

    x = jnp.ones((4, 8, 3)) * jnp.arange(4.0)[:, None, None]
    without = nn.vmap(Norm, variable_axes={"params": 0}, split_rngs={"params": True})
    with pytest.raises(ScopeCollectionNotFound):
        variables = without().init(jax.random.key(0), x)
        without().apply(variables, x, mutable=["batch_stats"])
    with_axes = nn.vmap(Norm, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True})
    variables = with_axes().init(jax.random.key(0), x)
    _, updates = with_axes().apply(variables, x, mutable=["batch_stats"])
    mean = updates["batch_stats"]["BatchNorm_0"]["mean"]
    assert mean.shape == (4, 3) and float(mean[3, 0]) > float(mean[0, 0])  # per member


@spec("bn.flax.axis_name_fails_outside_a_mapped_axis_in_training_only")
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_flax_batchnorm_with_an_axis_name_fails_outside_shard_map_or_pmap_in_training_only(api):
    """``BatchNorm(axis_name="batch")`` averages its statistics with ``lax.pmean`` over that
    axis, which exists only inside ``shard_map``/``pmap``/``vmap(axis_name=...)``: called
    plainly in training it raises ``NameError: unbound axis name`` (a model configured for
    data parallelism cannot be run on one device as it is). Eval uses the running
    statistics and no collective, so it works; so does linen's ``init``, which skips the
    ``pmean``. Inside a named axis of two members the statistics are the pooled ones.

    Catches: a ``pmean`` that ignores an unbound axis (training would run)."""
    x = jnp.arange(12.0).reshape(4, 3)
    xs = jnp.stack([x, x + 1.0])  # two members of the named axis
    if api == "linen":
        layer = nn.BatchNorm(axis_name="batch")
        variables = layer.init(jax.random.key(0), x, use_running_average=False)

        def train(x):
            return layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])[0]

        def evaluate(x):
            return layer.apply(variables, x, use_running_average=True)

        def mapped(xs):
            return jax.vmap(train, axis_name="batch")(xs)
    else:
        layer = nnx.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0))

        def train(x):
            return layer(x, use_running_average=False)

        def evaluate(x):
            return layer(x, use_running_average=True)

        def mapped(xs):  # the state enters the trace as an argument (nnx Variables are trace-bound)
            graphdef, state = nnx.split(layer)

            def run(state, x):
                return nnx.merge(graphdef, state)(x, use_running_average=False)

            return jax.vmap(run, in_axes=(None, 0), axis_name="batch")(state, xs)

    with pytest.raises(NameError, match="unbound axis name: batch"):
        train(x)
    # mean 0, var 1: measured 6.4e-7 (values up to 11)
    np.testing.assert_allclose(evaluate(x), x / np.sqrt(1 + 1e-5), rtol=1e-6, atol=1e-6)
    pooled = np.asarray(xs).reshape(8, 3)
    want = (np.asarray(x) - pooled.mean(0)) / np.sqrt(pooled.var(0) + 1e-5)
    np.testing.assert_allclose(mapped(xs)[0], want, rtol=1e-5, atol=1e-5)  # measured exact (0.0)


@spec("bn.nnx.eval_returns_none_not_the_module", framework="nnx")
def test_nnx_eval_and_train_switch_the_module_in_place_and_return_none():
    """torch's ``model.eval()`` returns the model, so ``model.eval()(x)`` is a habit; NNX's
    ``.eval()``/``.train()`` set ``use_running_average``/``deterministic`` in place and
    return None, so the habit raises ``TypeError: 'NoneType' object is not callable``.

    Catches: eval returning the module."""
    model = _BnDrop(nnx.Rngs(0))
    assert model.eval() is None and model.bn.use_running_average and model.drop.deterministic
    with pytest.raises(TypeError, match="'NoneType' object is not callable"):
        model.eval()(jnp.ones((4, 3)))
    assert model.train() is None and not model.bn.use_running_average and not model.drop.deterministic


class _BnDrop(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.bn, self.drop = nnx.BatchNorm(3, rngs=rngs), nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.bn(x))


@spec("bn.nnx.view_gives_an_eval_copy_and_leaves_the_original_training", framework="nnx")
def test_nnx_view_returns_an_eval_mode_module_and_leaves_the_original_in_training_mode():
    """``nnx.view(model, use_running_average=True, deterministic=True)`` returns a module in
    eval mode that shares the original's Variables, and leaves the original in training
    mode, unlike ``.eval()``. Evaluating the view updates nothing and drops nothing. It
    exists in every flax this project supports (0.12.4 to 0.12.8); the test says so where
    it is missing.

    Catches: a view that switches the original too; a view that copies the Variables."""
    if not hasattr(nnx, "view"):
        pytest.fail(f"nnx.view is missing in flax {flax.__version__}: the row says every flax from 0.12.4 has it")
    model = _BnDrop(nnx.Rngs(0))
    view = nnx.view(model, use_running_average=True, deterministic=True)
    assert view.bn.use_running_average and view.drop.deterministic
    assert not model.bn.use_running_average and not model.drop.deterministic  # still training
    assert view.bn.mean is model.bn.mean  # the same Variable
    x = jnp.arange(12.0).reshape(4, 3)
    np.testing.assert_allclose(view(x), x / np.sqrt(1 + 1e-5), rtol=1e-6, atol=1e-6)  # measured 6.4e-7
    assert not np.any(model.bn.mean[...])
    model.bn.mean[...] = jnp.ones(3)  # the original's statistics are the view's
    np.testing.assert_allclose(view(x), (x - 1) / np.sqrt(1 + 1e-5), rtol=1e-6, atol=1e-6)  # measured 4.4e-7


@spec("bn.nnx.call_arguments_override_eval", framework="nnx")
def test_nnx_call_time_use_running_average_and_deterministic_override_eval():
    """After ``.eval()`` a call with ``use_running_average=False`` still normalises with the
    batch statistics and updates the running ones, and ``deterministic=False`` still drops:
    the call argument wins over the attribute ``.eval()`` set.

    Catches: the attribute winning over the call argument."""
    model = _BnDrop(nnx.Rngs(0))
    model.eval()
    x = jnp.arange(12.0).reshape(4, 3)
    y = model.bn(x, use_running_average=False)
    # measured exact (0.0) for both; the tolerances allow another reduction order
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.bn.mean[...], 0.01 * x.mean(0), rtol=1e-6, atol=1e-7)  # momentum 0.99
    dropped = model.drop(jnp.ones(256), deterministic=False)
    assert 0 < int((dropped == 0).sum()) < 256
