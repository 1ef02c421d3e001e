"""The Dropout spec: scaling, rates, channel-wise masks, and where each framework's
randomness comes from. Flax means the stock ``flax.linen.Dropout`` / ``flax.nnx.Dropout``."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
import torch
import torch._inductor.config as inductor_config
from flax import linen as nn
from flax import nnx
from frameworks import FRAMEWORKS
from packaging.version import Version

import flaxbn

spec = pytest.mark.spec


def dropout(fw: str, x: np.ndarray, rate: float, *, train: bool = True, seed: int = 0, broadcast_dims=()) -> np.ndarray:
    """One dropout of ``x`` in framework ``fw``; ``broadcast_dims=(1, 2)`` on NHWC input is
    channel-wise (torch: ``Dropout2d`` on the NCHW transpose)."""
    if fw == "torch":
        torch.manual_seed(seed)
        layer = torch.nn.Dropout2d(rate) if broadcast_dims else torch.nn.Dropout(rate)
        t = torch.from_numpy(x)
        t = t.permute(0, 3, 1, 2) if broadcast_dims else t  # (N, H, W, C) -> (N, C, H, W)
        y = layer.train(train)(t)
        return (y.permute(0, 2, 3, 1) if broadcast_dims else y).numpy()
    if fw == "linen":
        layer = nn.Dropout(rate, broadcast_dims=broadcast_dims)
        return np.asarray(
            layer.apply({}, jnp.asarray(x), deterministic=not train, rngs={"dropout": jax.random.key(seed)})
        )
    layer = nnx.Dropout(rate, broadcast_dims=broadcast_dims, rngs=nnx.Rngs(dropout=seed))
    return np.asarray(layer(jnp.asarray(x), deterministic=not train))


def _ones(*shape) -> np.ndarray:
    return np.ones(shape, np.float32)


@spec("dropout.rate_outside_0_1.torch_raises_flax_silent")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_a_rate_outside_0_1_raises_in_torch_and_is_silent_in_flax(fw):
    """Flax keeps each unit with probability 1 - rate, clipped: rate 1.5 drops everything;
    rate -0.5 keeps everything and divides it by 1.5, so the output is scaled down."""
    if fw == "torch":
        for rate in (1.5, -0.5):
            with pytest.raises(ValueError, match=f"dropout probability has to be between 0 and 1, but got {rate}"):
                torch.nn.Dropout(rate)
    else:
        np.testing.assert_array_equal(dropout(fw, _ones(4, 8), 1.5), np.zeros((4, 8)))
        np.testing.assert_array_equal(dropout(fw, _ones(4, 8), -0.5), np.full((4, 8), np.float32(1 / 1.5)))


@spec("dropout.rate_outside_0_1.flaxbn_validates", framework="cross")
def test_flaxbn_rejects_a_rate_outside_0_1_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\], got 1.5"):
        flaxbn.MLPConfig(dropout=1.5)
    with pytest.raises(ValueError, match=r"dropout2d must be in \[0, 1\], got -0.1"):
        flaxbn.CNNConfig(dropout2d=-0.1)


def jax_divides_eagerly() -> bool:
    """Flax writes ``inputs / keep_prob`` (every version), and XLA rewrites a division by a
    scalar into a product with its reciprocal: for a compile-time constant (``jax.jit``) in
    every version, for a runtime scalar only from jaxlib 0.10.1 (XLA ships in jaxlib). Run
    eagerly, the Python float is a runtime scalar, so before jaxlib 0.10.1 eager Flax
    divides (checked: 0.8.1, 0.9.2, 0.10.0) and from it multiplies (0.10.1, 0.10.2)."""
    return Version(jaxlib.__version__).release < (0, 10, 1)


def _flax_dropout_jitted(fw: str, x: np.ndarray, rate: float, seed: int = 0) -> np.ndarray:
    """``dropout(fw, x, rate)`` with the Flax call inside ``jax.jit`` / ``nnx.jit``."""
    if fw == "linen":
        apply = jax.jit(lambda x, key: nn.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": key}))
        return np.asarray(apply(jnp.asarray(x), jax.random.key(seed)))
    layer = nnx.Dropout(rate, rngs=nnx.Rngs(dropout=seed))
    return np.asarray(nnx.jit(lambda layer, x: layer(x))(layer, jnp.asarray(x)))


@spec("dropout.inverted_scaling")
@pytest.mark.parametrize("rate", [0.1, 0.25, 0.3, 0.7])
@pytest.mark.parametrize(
    ("fw", "jit"),
    [
        pytest.param(fw, jit, id=f"{fw}-{'jit' if jit else 'eager'}")
        for fw, jit in [("torch", False), ("linen", False), ("linen", True), ("nnx", False), ("nnx", True)]
    ],
)
def test_kept_units_are_multiplied_by_one_over_keep_except_eager_flax_before_jaxlib_0_10_1_which_divides(
    fw, jit, rate, record_property
):
    """Kept units are scaled by 1/(1-p), dropped ones are exactly 0. torch multiplies by
    float32(1/(1-p)); Flax computes ``inputs / keep_prob``, which is the same product under
    ``jax.jit`` (XLA rewrites a division by a constant) and eagerly from jaxlib 0.10.1 (XLA
    then rewrites a division by any scalar), and the correctly rounded quotient eagerly
    before (``jax_divides_eagerly``). For these rates the two differ in the last bit
    for 10% to 34% of the values, so each case is checked bit for bit against the rule for
    the installed jax, under jit and eagerly; the record says which rule applied.

    Catches: Flax computing a true division (a full-size runtime divisor XLA cannot rewrite),
    eagerly or under jit; the expected eager rule flipped; torch dividing."""
    x = np.random.default_rng(0).uniform(1, 2, (64, 64)).astype(np.float32)
    multiplied, divided = x * np.float32(1 / (1 - rate)), x / np.float32(1 - rate)
    assert (multiplied != divided).mean() > 0.05  # the rates where the two roundings part
    y = _flax_dropout_jitted(fw, x, rate) if jit else dropout(fw, x, rate)
    kept = y != 0
    assert 0 < kept.sum() < kept.size and np.all(y[~kept] == 0.0)
    rule = "x / keep" if fw != "torch" and not jit and jax_divides_eagerly() else "x * (1/keep)"
    record_property("branch", f"{fw}{' under jit' if jit else ''}: {rule} (jaxlib {jaxlib.__version__})")
    want = divided if rule == "x / keep" else multiplied
    np.testing.assert_array_equal(y[kept], want[kept], err_msg=f"{fw}: kept values are not exactly {rule}")


@spec("dropout.eval_is_identity")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_eval_is_the_identity(fw):
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    np.testing.assert_array_equal(dropout(fw, x, 0.5, train=False), x)


@spec("dropout.p0_is_identity_in_training")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_rate_0_is_the_identity_in_training(fw):
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    np.testing.assert_array_equal(dropout(fw, x, 0.0), x)


@spec("dropout.p1_zeroes_torch_keeps_nan_flax_does_not")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_rate_1_gives_zeros_but_torch_multiplies_so_inf_and_nan_become_nan(fw):
    """(At any rate a dropped inf becomes NaN in torch: ``dropout.torch.dropped_inf_becomes_nan_at_any_rate``.)"""
    x = np.array([[1.0, np.inf, np.nan, -2.0]], np.float32)
    y = dropout(fw, x, 1.0)
    if fw == "torch":
        np.testing.assert_array_equal(y, [[0.0, np.nan, np.nan, 0.0]])  # x * 0
    else:
        np.testing.assert_array_equal(y, np.zeros((1, 4)))  # zeros_like: "prevent gradient NaNs"


@spec("dropout.torch.dropped_inf_becomes_nan_at_any_rate")
@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_torch_turns_a_dropped_inf_into_nan_at_any_rate_and_flax_into_zero(fw, rate):
    """torch multiplies by the scaled mask, so a dropped +-inf is inf * 0 = NaN at every rate,
    not only at p = 1 (a non-finite activation that dropout was expected to remove comes out
    NaN and poisons the loss); Flax selects ``zeros_like`` for dropped units: 0.

    Catches: torch selecting instead of multiplying (``torch.where(mask, x * scale, 0)``);
    Flax multiplying ``x * mask / keep``."""
    x = np.tile(np.array([np.inf, -np.inf], np.float32), (256, 1))
    y = dropout(fw, x, rate, seed=1)
    kept = np.isinf(y)
    assert 0 < kept.sum() < kept.size
    np.testing.assert_array_equal(y[kept], x[kept])
    dropped = y[~kept]
    assert np.isnan(dropped).all() if fw == "torch" else np.all(dropped == 0.0)


@spec("dropout.dropped_negative_is_minus_zero_in_torch_plus_zero_in_flax")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_a_dropped_negative_value_is_minus_zero_in_torch_and_plus_zero_in_flax(fw):
    """torch's ``x * 0`` keeps the sign of a negative x: -0.0; Flax's ``zeros_like`` is +0.0.
    Equal as numbers, but not bit for bit (``np.array_equal`` on ``view(np.uint32)``, hashes,
    ``copysign``, ``1 / y``): a bitwise comparison of masked outputs across the frameworks
    must compare values, not bytes.

    Catches: torch selecting zeros for dropped units; Flax multiplying by the mask."""
    x = np.full((64, 64), -2.0, np.float32)
    y = dropout(fw, x, 0.5, seed=2)
    dropped = y == 0
    assert 0 < dropped.sum() < dropped.size
    assert np.signbit(y[dropped]).all() if fw == "torch" else not np.signbit(y[dropped]).any()


@spec("dropout.keep_rate_within_binomial_bounds")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_the_keep_rate_is_one_minus_p_within_binomial_bounds(fw):
    """n = 200,000 draws at p = 0.3: |kept - 0.7 n| <= 6 sigma = 1,230. For any seed the
    chance of a miss is 2e-9; with the fixed seeds here the test is deterministic."""
    n, p = 200_000, 0.3
    kept = int((dropout(fw, _ones(400, 500), p, seed=11) != 0).sum())
    assert abs(kept - (1 - p) * n) <= 6 * np.sqrt(n * p * (1 - p))


@spec("dropout.channelwise_one_mask_value_per_sample_and_channel")
@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_channel_dropout_draws_one_mask_value_per_sample_and_channel(fw):
    """torch ``Dropout2d`` on NCHW == Flax ``Dropout(broadcast_dims=(1, 2))`` on NHWC."""
    y = dropout(fw, _ones(8, 5, 5, 16), 0.5, broadcast_dims=(1, 2))  # (N, H, W, C)
    per_channel = y.reshape(8, 25, 16)
    assert np.all(per_channel == per_channel[:, :1, :])  # constant over H and W
    assert 0 < (per_channel[:, 0, :] == 0).sum() < 8 * 16  # some channels dropped, not all
    masks = per_channel[:, 0, :] != 0  # (N, C): one draw per sample and channel, not one per channel
    assert len({m.tobytes() for m in masks}) > 1


@spec("dropout.torch.functional_defaults_to_training", framework="torch")
def test_torch_functional_dropout_defaults_to_training_true():
    """``F.dropout(x, p)`` drops even in a model in eval mode (pytorch#141557)."""
    torch.manual_seed(0)
    assert (torch.nn.functional.dropout(torch.ones(100), 0.5) == 0).any()


@spec("dropout.torch.global_generator_same_seed_same_mask", framework="torch")
def test_torch_draws_from_the_global_generator_and_the_same_seed_gives_the_same_mask():
    x = _ones(32, 32)
    assert np.array_equal(dropout("torch", x, 0.5, seed=3), dropout("torch", x, 0.5, seed=3))
    assert not np.array_equal(dropout("torch", x, 0.5, seed=3), dropout("torch", x, 0.5, seed=4))
    torch.manual_seed(3)
    layer = torch.nn.Dropout(0.5)
    assert not torch.equal(layer(torch.ones(32, 32)), layer(torch.ones(32, 32)))  # the generator advances


@spec("dropout.torch.compile_draws_other_masks_unless_fallback_random", framework="torch")
def test_torch_compile_draws_other_masks_than_eager_unless_fallback_random_is_set():
    """Inductor has its own RNG (pytorch/torchdynamo#2042); ``fallback_random`` restores eager's."""

    def f(x):
        return torch.nn.functional.dropout(x, 0.5, training=True)

    x = torch.ones(4096)
    torch.manual_seed(0)
    eager = f(x)
    torch._dynamo.reset()
    torch.manual_seed(0)
    assert not torch.equal(torch.compile(f)(x), eager)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(0)
        assert torch.equal(torch.compile(f)(x), eager)
    torch._dynamo.reset()


@spec("dropout.linen.rng_streams_dropout_then_params_fallback", framework="linen")
def test_linen_takes_the_dropout_stream_falls_back_to_params_and_raises_only_without_either():
    layer, x = nn.Dropout(0.5), jnp.ones((16, 16))
    with_dropout = layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    only_params = layer.apply({}, x, deterministic=False, rngs={"params": jax.random.key(0)})  # silent fallback
    assert (np.asarray(with_dropout) == 0).any() and (np.asarray(only_params) == 0).any()
    with pytest.raises(flax.errors.InvalidRngError, match='needs PRNG for "dropout"'):
        layer.apply({}, x, deterministic=False)


@spec("dropout.linen.same_key_same_mask_fold_in_for_fresh_masks", framework="linen")
def test_linen_gives_the_same_mask_for_the_same_key_so_a_loop_must_fold_in_the_step():
    x = _ones(32, 32)
    key = jax.random.key(0)

    def masks(key):
        return np.asarray(nn.Dropout(0.5).apply({}, x, deterministic=False, rngs={"dropout": key})) != 0

    assert np.array_equal(masks(key), masks(key))
    step_masks = [masks(jax.random.fold_in(key, step)) for step in range(3)]
    assert not np.array_equal(step_masks[0], step_masks[1]) and not np.array_equal(step_masks[1], step_masks[2])


@spec("dropout.nnx.streams_advance_also_under_nnx_jit", framework="nnx")
def test_nnx_rng_streams_advance_on_every_call_also_under_nnx_jit():
    layer, x = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0)), jnp.ones((32, 32))
    a, b = layer(x), layer(x)
    assert not np.array_equal(a, b)
    step = nnx.jit(lambda m, x: m(x))
    c, d = step(layer, x), step(layer, x)
    assert not np.array_equal(c, d) and not np.array_equal(b, c)
    assert int(layer.rngs.count[...]) == 4  # the layer's own stream, forked at construction


@spec("dropout.nnx.reseed_reproduces_masks", framework="nnx")
def test_nnx_reseed_reproduces_the_masks():
    layer, x = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0)), jnp.ones((32, 32))
    first, second = layer(x), layer(x)
    nnx.reseed(layer, dropout=0)
    np.testing.assert_array_equal(layer(x), first)
    np.testing.assert_array_equal(layer(x), second)


@spec("dropout.nnx.split_merge_in_jax_jit_repeats_the_mask", framework="nnx")
def test_nnx_split_merge_inside_jax_jit_repeats_one_mask_unless_the_rng_state_is_returned():
    """The classic trap: the RNG count advances inside the trace but is thrown away."""
    layer, x = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=0)), jnp.ones((32, 32))
    graphdef, state = nnx.split(layer)

    @jax.jit
    def trap(state, x):
        return nnx.merge(graphdef, state)(x)

    np.testing.assert_array_equal(trap(state, x), trap(state, x))  # the same mask every step

    @jax.jit
    def fixed(state, x):
        model = nnx.merge(graphdef, state)
        return model(x), nnx.state(model)

    y1, state = fixed(state, x)
    y2, state = fixed(state, x)
    assert not np.array_equal(y1, y2)


@spec("dropout.same_seed_same_mask_sequence")
@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_two_models_built_from_the_same_seed_draw_the_same_sequence_of_masks(api):
    from compare import registry

    spec_ = registry.get("mlp").replace(in_features=16, hidden=(32,))
    x = jnp.ones((8, 16))
    if api == "nnx":
        a, b = spec_.build_nnx(nnx.Rngs(params=0, dropout=5)), spec_.build_nnx(nnx.Rngs(params=0, dropout=5))
        seq_a, seq_b = [a(x) for _ in range(3)], [b(x) for _ in range(3)]
    else:
        model = spec_.build_linen()
        variables = model.init(jax.random.key(0), x, train=False)

        def run(step):
            key = jax.random.fold_in(jax.random.key(5), step)
            return model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0]

        seq_a, seq_b = [run(s) for s in range(3)], [run(s) for s in range(3)]
    for ya, yb in zip(seq_a, seq_b, strict=True):
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(seq_a[0], seq_a[1])
