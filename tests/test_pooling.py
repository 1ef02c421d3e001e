"""flaxbn's 2x2 max pool: the values of ``nn.max_pool`` and the gradient rule of torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from flaxbn.pooling import max_pool_2x2


def _relu_input(seed=0) -> np.ndarray:
    x = np.maximum(np.random.default_rng(seed).standard_normal((4, 6, 8, 3)), 0).astype(
        np.float32
    )  # zero windows: ties
    x[0, 0, 0, 0] = x[0, 0, 1, 0] = 5.0  # a tie in the top row of a window
    x[1, 2, 2, 1] = x[1, 3, 2, 1] = x[1, 3, 3, 1] = 7.0  # a tie down the left column
    return x


def _torch_pool_grad(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)  # (N, H, W, C) -> (N, C, H, W)
    torch.nn.functional.max_pool2d(xt, 2).backward(torch.from_numpy(g).permute(0, 3, 1, 2))
    return xt.grad.permute(0, 2, 3, 1).numpy()


def test_values_equal_flax_max_pool_bit_for_bit_nan_included():
    x = _relu_input()
    x[2, 4, 4, 2] = np.nan
    got = np.asarray(max_pool_2x2(jnp.asarray(x)))
    np.testing.assert_array_equal(got, nn.max_pool(jnp.asarray(x), (2, 2), strides=(2, 2)))
    assert np.isnan(got[2, 2, 2, 2])


@pytest.mark.spec("cross.pool.max_pool_gradient_goes_to_the_first_maximum")
@pytest.mark.parametrize("pool", ["flaxbn", "flax"])
def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window_like_torch(pool):
    """torch, ``nn.max_pool`` and flaxbn's pool route a window's gradient to its first
    maximum (row-major); a plain reshape + ``jnp.max`` would split it among ties."""
    x = _relu_input()
    g = np.random.default_rng(1).standard_normal((4, 3, 4, 3)).astype(np.float32)
    fn = max_pool_2x2 if pool == "flaxbn" else (lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)))
    got = jax.vjp(fn, jnp.asarray(x))[1](jnp.asarray(g))[0]
    np.testing.assert_array_equal(np.asarray(got), _torch_pool_grad(x, g))
    split = jax.grad(lambda x: (x.reshape(4, 3, 2, 4, 2, 3).max(axis=(2, 4)) * g).sum())(jnp.asarray(x))
    assert not np.array_equal(np.asarray(split), np.asarray(got))
