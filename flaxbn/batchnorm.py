"""BatchNorm for linen and nnx, in two semantics, with the same variables.

Variables of every class here: ``params/{scale, bias}`` and
``batch_stats/{mean, var, num_batches_tracked}`` (the counter is int32, +1 per training
forward, like torch's buffer of that name), so one weight map serves all of them.

``bn_semantics="flax"`` (:class:`LinenBatchNorm`, :class:`NnxBatchNorm`): the stock Flax
BatchNorm, subclassed, with its statistics unchanged:

* training normalises with the batch mean and the *biased* batch variance and updates
  ``running = momentum * running + (1 - momentum) * batch`` with the *biased* variance;
* eval (``use_running_average=True``) uses the running statistics and changes nothing;
* two additions: the counter, and a guard for an empty batch, which stock Flax turns
  into NaN running statistics; here the statistics are left alone and the batch is
  counted, as torch does.

``bn_semantics="torch"`` (:class:`LinenTorchBatchNorm`, :class:`NnxTorchBatchNorm`):
torch's ``BatchNorm*d`` statistics, so that a Flax model can follow a torch training run
exactly: the running variance is updated with the *unbiased* batch variance (times
n/(n-1)), ``momentum=None`` is torch's cumulative average over ``num_batches_tracked``,
``track_running_stats=False`` uses batch statistics in eval too, a batch of one value per
channel raises, and ``epsilon <= 0`` raises. ``momentum`` keeps Flax's direction (0.9 is
torch's 0.1).

How the batch variance is computed (``variance``, the config's ``bn_variance``):
``"two_pass"`` (the default, as torch) takes the mean, then the mean of the squared
deviations: exact, but it reads every activation twice. ``"shifted"`` reads them once:
it accumulates the sum and the sum of squares of ``x - K`` in float32, where the shift
``K`` is the first sample's value of each feature (``stop_gradient``), so the two sums
stay of the size of the spread, not of the mean: no catastrophic cancellation where
Flax's one-pass ``use_fast_variance`` loses everything (large means, tiny spreads).
Across devices (``axis_name``) the per-device moments are merged as Chan et al. do:
``var = mean_d(var_d + (mean_d - mean)^2)``. :class:`LinenOnePassBatchNorm` and
:class:`NnxOnePassBatchNorm` are the Flax-semantics layers with it; the torch-semantics
layers take ``variance`` too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

VARIANCES = ("two_pass", "shifted")


def _moments(x: jax.Array, variance: str = "two_pass", axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-feature (last axis) mean and *biased* variance in float32 (float64 stays), over
    every other axis and, with ``axis_name``, over the devices of that mesh axis (equal
    shards). ``variance``: "two_pass" or "shifted" (see the module docstring)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    if variance == "two_pass":
        mean = jnp.mean(x, axes)
        if axis_name is not None:
            mean = jax.lax.pmean(mean, axis_name)
        return mean, _pmean(jnp.mean(jnp.square(x - mean), axes), axis_name)
    if variance != "shifted":
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    shift = jax.lax.stop_gradient(x.reshape(-1, x.shape[-1])[0])  # one sample's values: inside the data's range
    d = x - shift
    s1, s2 = jnp.mean(d, axes), jnp.mean(jnp.square(d), axes)  # one pass: XLA fuses both reductions
    mean, var = shift + s1, jnp.maximum(s2 - jnp.square(s1), 0.0)
    if axis_name is None:
        return mean, var
    global_mean = jax.lax.pmean(mean, axis_name)  # Chan's merge of equal-sized shards
    return global_mean, jax.lax.pmean(var + jnp.square(mean - global_mean), axis_name)


def _pmean(x: jax.Array, axis_name: str | None) -> jax.Array:
    return x if axis_name is None else jax.lax.pmean(x, axis_name)


def _per_channel_count(x: jax.Array) -> int:
    return math.prod(x.shape[:-1])


def _torch_running_update(mean, var, count, batch_mean, batch_var, n: int, momentum: float | None):
    """torch's update: weight ``1 - momentum`` (Flax direction) or ``1 / count`` for the
    cumulative average, and the *unbiased* batch variance."""
    count = count + 1
    # the cumulative factor in the statistics' own dtype: float64 runs stay exact (float32 here drifted 1e-7)
    factor = 1.0 / count.astype(mean.dtype) if momentum is None else 1.0 - momentum
    unbiased = batch_var * (n / (n - 1))
    return (1 - factor) * mean + factor * batch_mean, (1 - factor) * var + factor * unbiased, count


def _flax_running_update(mean, var, batch_mean, batch_var, momentum: float):
    """Stock Flax's update: ``momentum`` weighs the old value, the *biased* batch variance;
    no gradient flows into the running statistics."""
    batch_mean, batch_var = jax.lax.stop_gradient(batch_mean), jax.lax.stop_gradient(batch_var)
    return momentum * mean + (1 - momentum) * batch_mean, momentum * var + (1 - momentum) * batch_var


def _linen_variables(module: nn.Module, features: int, track_running_stats: bool):
    """(scale, bias, mean, var, count) of a linen BatchNorm here, named as nn.BatchNorm names
    them, plus the counter; the statistics are None without ``track_running_stats``."""
    scale = module.param("scale", module.scale_init, (features,)) if module.use_scale else None
    bias = module.param("bias", nn.initializers.zeros, (features,)) if module.use_bias else None
    if not track_running_stats:
        return scale, bias, None, None, None
    mean = module.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    var = module.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    count = module.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
    return scale, bias, mean, var, count


def _check_torch_batch(x: jax.Array, epsilon: float) -> None:
    if epsilon <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {epsilon}")
    if _per_channel_count(x) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input shape {x.shape}")


def _normalize(x, mean, var, scale, bias, epsilon: float) -> jax.Array:
    # epsilon inside the square root, as in torch and stock Flax
    y = (x - mean) * jax.lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * scale
    return y + bias if bias is not None else y


def _nnx_variables(module: nnx.Module, features: int, use_scale: bool, use_bias: bool, track_running_stats: bool):
    """The variables every BatchNorm here has, as nnx.BatchNorm names them, plus the counter."""
    module.scale = nnx.Param(jnp.ones((features,))) if use_scale else None
    module.bias = nnx.Param(jnp.zeros((features,))) if use_bias else None
    if track_running_stats:
        module.mean = nnx.BatchStat(jnp.zeros((features,)))
        module.var = nnx.BatchStat(jnp.ones((features,)))
        module.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))


# --- Flax semantics ----------------------------------------------------------------------


class LinenBatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` plus ``batch_stats/num_batches_tracked`` and an empty-batch
    guard. Statistics are updated only under ``mutable=["batch_stats"]``; nothing is
    counted during ``init``."""

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if x.size == 0 and not self.is_initializing():
            if not use_ra:
                count.value = count.value + 1
            return x  # nothing to normalise; stock Flax would write NaN statistics here
        y = super().__call__(x, use_running_average, mask=mask)
        if not use_ra and not self.is_initializing():
            count.value = count.value + 1
        return y


class NnxBatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` plus a ``num_batches_tracked`` ``BatchStat`` and an
    empty-batch guard. Statistics change in place in train mode, also under ``nnx.jit``."""

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if not use_ra:
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        if x.size == 0:
            return x  # nothing to normalise; stock Flax would write NaN statistics here
        return super().__call__(x, use_running_average, mask=mask)


# --- torch semantics ---------------------------------------------------------------------


class LinenTorchBatchNorm(nn.Module):
    """linen BatchNorm with torch's statistics (see the module docstring). Features on
    the last axis."""

    use_running_average: bool | None = None
    momentum: float | None = 0.9
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    track_running_stats: bool = True
    variance: str = "two_pass"
    scale_init: Callable = nn.initializers.ones  # zeros: a residual block that starts as the identity

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        scale, bias, ra_mean, ra_var, count = _linen_variables(self, x.shape[-1], self.track_running_stats)
        training = not use_ra and not self.is_initializing()
        if x.size == 0:
            if training and self.track_running_stats:
                count.value = count.value + 1
            return x
        if use_ra and self.track_running_stats:
            mean, var = ra_mean.value, ra_var.value
        else:
            if not self.is_initializing():  # batch statistics, in training or (no buffers) in eval: torch's checks
                _check_torch_batch(x, self.epsilon)
            mean, var = _moments(x, self.variance)
            if training and self.track_running_stats:
                ra_mean.value, ra_var.value, count.value = _torch_running_update(
                    ra_mean.value, ra_var.value, count.value, mean, var, _per_channel_count(x), self.momentum
                )
        return _normalize(x, mean, var, scale, bias, self.epsilon).astype(x.dtype)


class NnxTorchBatchNorm(nnx.Module):
    """nnx BatchNorm with torch's statistics (see the module docstring). Features on the
    last axis; ``model.train()`` / ``model.eval()`` switch ``use_running_average``."""

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        momentum: float | None = 0.9,
        epsilon: float = 1e-5,
        use_scale: bool = True,
        use_bias: bool = True,
        track_running_stats: bool = True,
        variance: str = "two_pass",
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # accepted for the same signature as nnx.BatchNorm; nothing is random
        self.variance = variance
        self.use_running_average = use_running_average
        self.momentum, self.epsilon, self.track_running_stats = momentum, epsilon, track_running_stats
        _nnx_variables(self, num_features, use_scale, use_bias, track_running_stats)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if x.size == 0:
            if not use_ra and self.track_running_stats:
                self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
            return x
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        if use_ra and self.track_running_stats:
            mean, var = self.mean[...], self.var[...]
        else:
            _check_torch_batch(x, self.epsilon)  # batch statistics, in training or (no buffers) in eval: torch's checks
            mean, var = _moments(x, self.variance)
            if not use_ra and self.track_running_stats:
                new = _torch_running_update(
                    self.mean[...],
                    self.var[...],
                    self.num_batches_tracked[...],
                    mean,
                    var,
                    _per_channel_count(x),
                    self.momentum,
                )
                self.mean[...], self.var[...], self.num_batches_tracked[...] = (jax.lax.stop_gradient(v) for v in new)
        return _normalize(x, mean, var, scale, bias, self.epsilon).astype(x.dtype)


# --- Flax semantics, one-pass shifted variance ------------------------------------------------


def _result_dtype(x: jax.Array, dtype) -> jnp.dtype:
    """As stock Flax: ``dtype`` when given, else the input promoted with the float32 parameters."""
    return dtype if dtype is not None else jnp.promote_types(x.dtype, jnp.float32)


class LinenOnePassBatchNorm(nn.Module):
    """linen BatchNorm with stock Flax statistics (biased running variance, ``momentum`` the
    weight of the old value, ``axis_name`` for synchronised statistics) and the one-pass
    shifted variance. Same variables as :class:`LinenBatchNorm`. Features on the last axis."""

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: jnp.dtype | None = None
    use_scale: bool = True
    use_bias: bool = True
    axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        scale, bias, ra_mean, ra_var, count = _linen_variables(self, x.shape[-1], track_running_stats=True)
        training = not use_ra and not self.is_initializing()
        if x.size == 0:
            if training:
                count.value = count.value + 1
            return x
        if use_ra:
            mean, var = ra_mean.value, ra_var.value
        else:
            mean, var = _moments(x, "shifted", None if self.is_initializing() else self.axis_name)
            if training:
                ra_mean.value, ra_var.value = _flax_running_update(
                    ra_mean.value, ra_var.value, mean, var, self.momentum
                )
                count.value = count.value + 1
        return _normalize(x, mean, var, scale, bias, self.epsilon).astype(_result_dtype(x, self.dtype))


class NnxOnePassBatchNorm(nnx.Module):
    """nnx BatchNorm with stock Flax statistics and the one-pass shifted variance (see
    :class:`LinenOnePassBatchNorm`). Same variables as :class:`NnxBatchNorm`."""

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: jnp.dtype | None = None,
        use_scale: bool = True,
        use_bias: bool = True,
        axis_name: str | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        if rngs is not None:  # draw the two keys nnx.BatchNorm draws: the layers after it get the same weights
            rngs.params()
            rngs.params()
        self.use_running_average = use_running_average
        self.momentum, self.epsilon, self.dtype, self.axis_name = momentum, epsilon, dtype, axis_name
        _nnx_variables(self, num_features, use_scale, use_bias, track_running_stats=True)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if x.size == 0:
            if not use_ra:
                self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
            return x
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        if use_ra:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = _moments(x, "shifted", self.axis_name)
            self.mean[...], self.var[...] = _flax_running_update(
                self.mean[...], self.var[...], mean, var, self.momentum
            )
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        return _normalize(x, mean, var, scale, bias, self.epsilon).astype(_result_dtype(x, self.dtype))
