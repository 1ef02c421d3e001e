"""Pooling with torch's semantics on channels-last arrays ``(N, *spatial, C)``.

* :func:`max_pool_2x2`: 2x2/2 max pooling, fast on XLA:CPU, with torch's gradient rule.
  ``flax.linen.max_pool`` lowers its gradient to XLA's ``select_and_scatter``, which on
  XLA:CPU costs most of a small CNN's training step (measured: 76 ms of ~190 ms for
  256x28x28x32, against 13 ms here). For non-overlapping 2x2 windows the pool is a reshape
  and a max; its gradient here goes to the *first* maximal element of each window in
  row-major order, exactly as torch's ``max_pool2d`` routes it (``jnp.max`` alone would
  split it among ties, which matters after a ReLU, where whole windows are 0). The
  forward values equal ``nn.max_pool``'s bit for bit, NaN included.
* :func:`max_pool`, :func:`avg_pool`: torch's ``max_pool{1,2,3}d`` / ``avg_pool{1,2,3}d``:
  its output size (``ceil_mode``), window placement and divisor (``count_include_pad``,
  ``divisor_override``); max pooling pads with ``-inf`` and takes :func:`max_pool_2x2` for
  its 2x2/2 case. The Flax code ``compare.port`` generates calls these.
* :func:`adaptive_avg_pool`, :func:`adaptive_max_pool`: to any output size, torch's
  windows ``[floor(i*n/m), ceil((i+1)*n/m))``, one axis after the other (a rectangle's
  mean is the mean of its rows' means). Every size is read from the array at trace time,
  so one function serves every input size torch accepts.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)  # (N, H, W, C) -> (N, H/2, dh, W/2, dw, C)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, H/2, W/2, C), H and W even."""
    return jnp.max(_windows(x), axis=(2, 4))


def _forward(x):
    win = _windows(x)
    corners = [win[:, :, dh, :, dw, :] for dh in (0, 1) for dw in (0, 1)]  # 4 x (N, H/2, W/2, C), row-major
    # The first maximum by argmax, not by comparing with the max: under jit XLA may
    # recompute the inputs in another fusion, and an equality test can then miss by an ulp.
    index = jnp.argmax(jnp.stack(corners, axis=-1), axis=-1)  # argmax: first occurrence; NaN counts as maximal
    first = [index == k for k in range(4)]
    rows = [jnp.stack(first[0:2], axis=3), jnp.stack(first[2:4], axis=3)]  # (N, H/2, W/2, dw, C)
    return jnp.max(win, axis=(2, 4)), jnp.stack(rows, axis=2)  # mask: (N, H/2, dh, W/2, dw, C)


def _backward(first, g):
    gx = jnp.where(first, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    n, h2, _, w2, _, c = first.shape
    return (gx.reshape(n, 2 * h2, 2 * w2, c),)


max_pool_2x2.defvjp(_forward, _backward)


# --- torch's pooling in general ------------------------------------------------------------


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,) * n


def _pool_geometry(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> tuple[int, int]:
    """(output size, padding after the input) of one spatial axis, as torch computes them."""
    span = d * (k - 1) + 1
    if 2 * p > span:
        raise ValueError(f"pad should be at most half of effective kernel size, but got pad={p}, kernel_size={k}")
    out = (size + 2 * p - span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input or the left padding
        out -= 1
    if out < 1:
        raise ValueError(f"output size is too small: input {size}, kernel {k}, stride {s}, padding {p}")
    return out, max((out - 1) * s + span - size - p, 0)


def _geometry(x: jax.Array, kernel, stride, padding, dilation, ceil_mode):
    n = x.ndim - 2
    kernel = _tuple(kernel, n)
    stride = kernel if stride is None or stride == () else _tuple(stride, n)  # torch: stride defaults to the kernel
    padding, dilation = _tuple(padding, n), _tuple(dilation, n)
    geometry = [
        _pool_geometry(x.shape[1 + i], kernel[i], stride[i], padding[i], dilation[i], ceil_mode) for i in range(n)
    ]
    pads = ((0, 0), *((p, hi) for p, (_, hi) in zip(padding, geometry, strict=True)), (0, 0))
    return kernel, stride, padding, dilation, pads


def max_pool(x: jax.Array, kernel, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> jax.Array:
    """torch's ``max_pool{1,2,3}d`` on ``(N, *spatial, C)``; padding counts as ``-inf``."""
    kernel, stride, padding, dilation, pads = _geometry(x, kernel, stride, padding, dilation, ceil_mode)
    if x.ndim == 4 and kernel == stride == (2, 2) and padding == (0, 0) and dilation == (1, 1):
        if x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
            return max_pool_2x2(x)
    # a Python scalar init: JAX then uses its differentiable max/sum windows (an array init gives a generic one)
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, *kernel, 1), (1, *stride, 1), pads, window_dilation=(1, *dilation, 1)
    )


def avg_pool(
    x: jax.Array,
    kernel,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> jax.Array:
    """torch's ``avg_pool{1,2,3}d`` on ``(N, *spatial, C)``: the window sum divided by the
    window's size clipped to the padded input (``count_include_pad``), by the number of
    input elements in it, or by ``divisor_override``."""
    kernel, stride, padding, _, pads = _geometry(x, kernel, stride, padding, 1, ceil_mode)
    window, strides = (1, *kernel, 1), (1, *stride, 1)
    sums = lax.reduce_window(x, 0.0, lax.add, window, strides, pads)
    if divisor_override:
        return sums / divisor_override
    ones = jnp.ones((1, *x.shape[1:-1], 1), x.dtype)
    if count_include_pad:  # the explicit padding counts, the extra of ceil_mode does not
        ones = jnp.pad(ones, ((0, 0), *((p, p) for p in padding), (0, 0)), constant_values=1)
        pads = ((0, 0), *((0, max(hi - p, 0)) for p, (_, hi) in zip(padding, pads[1:-1], strict=True)), (0, 0))
    counts = lax.reduce_window(ones, 0.0, lax.add, window, strides, pads)
    return sums / counts


def _adaptive_axis(x: jax.Array, axis: int, out: int | None, reduce) -> jax.Array:
    size = x.shape[axis]
    if out is None or out == size:
        return x
    if size % out == 0:  # equal windows: one reshape
        shape = (*x.shape[:axis], out, size // out, *x.shape[axis + 1 :])
        return reduce(x.reshape(shape), axis + 1)
    windows = []
    for i in range(out):
        start, stop = (i * size) // out, -((-(i + 1) * size) // out)  # floor(i*n/m), ceil((i+1)*n/m)
        windows.append(reduce(lax.slice_in_dim(x, start, stop, axis=axis), axis))
    return jnp.stack(windows, axis=axis)


def _adaptive(x: jax.Array, output_size, reduce) -> jax.Array:
    sizes = _tuple(output_size, x.ndim - 2)
    for i, out in enumerate(sizes):
        x = _adaptive_axis(x, 1 + i, out, reduce)
    return x


def adaptive_avg_pool(x: jax.Array, output_size) -> jax.Array:
    """torch's ``adaptive_avg_pool{1,2,3}d`` on ``(N, *spatial, C)``; ``None`` keeps an axis."""
    return _adaptive(x, output_size, lambda a, axis: jnp.mean(a, axis=axis))


def adaptive_max_pool(x: jax.Array, output_size) -> jax.Array:
    """torch's ``adaptive_max_pool{1,2,3}d`` (without indices) on ``(N, *spatial, C)``."""
    return _adaptive(x, output_size, lambda a, axis: jnp.max(a, axis=axis))
