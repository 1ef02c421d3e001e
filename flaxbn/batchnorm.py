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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


def _moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-feature (last axis) mean and *biased* variance, two-pass, in float32."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(jnp.square(x - mean), axes)


def _per_channel_count(x: jax.Array) -> int:
    return math.prod(x.shape[:-1])


def _torch_running_update(mean, var, count, batch_mean, batch_var, n: int, momentum: float | None):
    """torch's update: weight ``1 - momentum`` (Flax direction) or ``1 / count`` for the
    cumulative average, and the *unbiased* batch variance."""
    count = count + 1
    factor = 1.0 / count.astype(jnp.float32) if momentum is None else 1.0 - momentum
    unbiased = batch_var * (n / (n - 1))
    return (1 - factor) * mean + factor * batch_mean, (1 - factor) * var + factor * unbiased, count


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

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_ra = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,)) if self.use_scale else None
        bias = self.param("bias", nn.initializers.zeros, (c,)) if self.use_bias else None
        if self.track_running_stats:
            ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
            ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
            count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        training = not use_ra and not self.is_initializing()
        if x.size == 0:
            if training and self.track_running_stats:
                count.value = count.value + 1
            return x
        if use_ra and self.track_running_stats:
            mean, var = ra_mean.value, ra_var.value
        else:
            if training:
                _check_torch_batch(x, self.epsilon)
            mean, var = _moments(x)
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
        rngs: nnx.Rngs | None = None,
    ):
        del rngs  # accepted for the same signature as nnx.BatchNorm; nothing is random
        self.use_running_average = use_running_average
        self.momentum, self.epsilon, self.track_running_stats = momentum, epsilon, track_running_stats
        self.scale = nnx.Param(jnp.ones((num_features,))) if use_scale else None
        self.bias = nnx.Param(jnp.zeros((num_features,))) if use_bias else None
        if track_running_stats:
            self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
            self.var = nnx.BatchStat(jnp.ones((num_features,)))
            self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))

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
            if not use_ra:
                _check_torch_batch(x, self.epsilon)
            mean, var = _moments(x)
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
