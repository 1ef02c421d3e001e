"""Model inputs that do not fit the architecture get one error naming what was expected,
in torch, linen and nnx alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from compare import registry
from compare.conventions import nchw_to_nhwc

CNN = registry.get("cnn").replace(in_channels=2, image_size=8, channels=(4, 8), hidden=16)
MLP = registry.get("mlp").replace(in_features=6, hidden=(8,))


def _call(api: str, spec, x: np.ndarray, train: bool):
    """Run the model of ``api`` on ``x`` (torch layout; transposed for Flax when 4-d)."""
    if api == "torch":
        model = spec.build_torch().train(train)
        return model(torch.from_numpy(x))
    xf = jnp.asarray(nchw_to_nhwc(x) if x.ndim == 4 else x)
    if api == "linen":
        model = spec.build_linen()
        variables = model.init(jax.random.key(0), jnp.zeros((2, *spec.flax_input_shape)), train=False)
        return model.apply(variables, xf, train=train, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    model = spec.build_nnx(nnx.Rngs(0))
    model.train() if train else model.eval()
    return model(xf)


CASES = [
    (MLP, np.zeros((4, 5), np.float32), False, r"shape \(4, 5\): expected \(N, 6\)"),
    (MLP, np.zeros((4, 6), np.int32), False, "expected a floating-point input"),
    (MLP, np.zeros((0, 6), np.float32), False, "empty batch"),
    (MLP, np.zeros((1, 6), np.float32), True, "a batch of one in training"),
    (CNN, np.zeros((4, 2, 8), np.float32), False, "expected rank 4"),
    (CNN, np.zeros((4, 3, 8, 8), np.float32), False, "expected 2 channels"),
    (CNN, np.zeros((4, 2, 16, 16), np.float32), False, "expected 8x8 images, got 16x16"),
]


@pytest.mark.parametrize("api", ["torch", "linen", "nnx"])
@pytest.mark.parametrize(
    "spec, x, train, message", CASES, ids=["features", "dtype", "empty", "one", "rank", "channels", "size"]
)
def test_a_misfit_input_raises_one_error_that_says_what_was_expected(api, spec, x, train, message):
    with pytest.raises(ValueError, match=message):
        _call(api, spec, x, train)


def test_all_problems_are_listed_at_once():
    with pytest.raises(
        ValueError, match=r"expected a floating-point input; shape \(0, 3, 16, 16\).*channels.*16x16.*empty batch"
    ):
        _call("torch", CNN, np.zeros((0, 3, 16, 16), np.int64), False)


def test_a_batch_of_one_is_fine_in_eval():
    assert tuple(_call("torch", MLP, np.zeros((1, 6), np.float32), False).shape) == (1, 10)
