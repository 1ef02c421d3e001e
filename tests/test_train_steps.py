"""The library's one training step, evaluation step and optimizer per side
(``torchbn.train``, ``flaxbn.train``), which the benchmark, the data-parallel checks and the
experiments use: what each does to BatchNorm's state, and that the two sides agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import flaxbn.train as ftrain
import torchbn.train as ttrain
from compare import registry, transfer
from compare.conventions import Precision, nchw_to_nhwc

SPEC = registry.get("cnn").replace(image_size=8, channels=(4, 8), hidden=16)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((6, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 6)


def test_the_eval_step_uses_running_statistics_and_updates_nothing_on_every_side():
    """Loss and accuracy of the eval-mode network, the same on torch, linen and nnx (float32
    sums in another order: 1e-6), and no BatchNorm buffer or counter moves."""
    torch.manual_seed(0)
    model = SPEC.build_torch()
    x, y = _batch()
    for _ in range(3):  # give the running statistics values of their own
        ttrain.train_step(model, ttrain.sgd(model), torch.from_numpy(x), torch.from_numpy(y))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, acc = ttrain.eval_step(model, torch.from_numpy(x), torch.from_numpy(y))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    variables = transfer.torch_to_linen(model.state_dict(), SPEC)
    state = ftrain.linen_init_state(variables, ftrain.sgd())
    xf, yf = jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(y)
    linen_loss, linen_acc = jax.jit(ftrain.linen_eval_step, static_argnums=0)(SPEC.build_linen().apply, state, xf, yf)
    nnx_model = transfer.torch_to_nnx(model.state_dict(), SPEC)
    nnx_loss, nnx_acc = nnx.jit(ftrain.nnx_eval_step)(nnx_model, xf, yf)
    np.testing.assert_allclose([float(linen_loss), float(nnx_loss)], float(loss), rtol=1e-6, atol=1e-6)
    assert float(acc) == float(linen_acc) == float(nnx_acc)
    assert int(nnx_model.bn1.num_batches_tracked[...]) == int(before["bn1.num_batches_tracked"])


def test_one_sgd_definition_per_side_gives_the_same_first_step():
    """``torchbn.train.sgd()`` and ``flaxbn.train.sgd()``: lr 0.1, momentum 0.9 (the
    benchmark's), the same update from the same gradient (bit for bit on this grad)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = ttrain.sgd([p])
    p.grad = torch.tensor([0.5, 0.25])
    opt.step()
    tx = ftrain.sgd()
    updates, _ = tx.update(jnp.array([0.5, 0.25]), tx.init(jnp.array([1.0, -2.0])))
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(jnp.array([1.0, -2.0]), updates)), p.detach().numpy())
    assert opt.defaults["lr"] == 0.1 and opt.defaults["momentum"] == 0.9


def test_a_precision_is_decoded_once_for_both_frameworks():
    mixed, full = Precision("bfloat16"), Precision("float32")
    assert mixed.mixed and mixed.torch_dtype() == torch.bfloat16 and mixed.jax_dtype() == jnp.bfloat16
    a = torch.ones(4, 4)
    with mixed.autocast("cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with full.autocast("cpu"):
        assert (a @ a).dtype == torch.float32
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16, got 'float16'"):
        Precision("float16")
