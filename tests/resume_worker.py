"""Trains a few steps in a fresh process, from scratch or from a checkpoint, and saves one.

python tests/resume_worker.py {torch|linen|nnx} N_STEPS OUT [IN]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

import flaxbn.train as ftrain
import torchbn.train as ttrain
from compare import registry
from compare.conventions import nchw_to_nhwc
from compare.io import train_state

# dropout active in both places (channel-wise and element-wise), BatchNorm everywhere
SPEC = registry.get("cnn").replace(in_channels=1, image_size=8, channels=(4, 8), hidden=16, dropout=0.3, dropout2d=0.2)


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The data of global step ``step`` (torch layout), the same in every process."""
    rng = np.random.default_rng(step)
    return rng.standard_normal((8, 1, 8, 8), dtype=np.float32), rng.integers(0, 10, 8)


def run_torch(n: int, out: str, ckpt: str | None) -> None:
    if ckpt:
        _, model, opt, step = train_state.load_torch(ckpt)
    else:
        torch.manual_seed(0)
        model, step = SPEC.build_torch(), 0
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for s in range(step, step + n):
        x, y = batch(s)
        ttrain.train_step(model, opt, torch.from_numpy(x), torch.from_numpy(y))
    train_state.save_torch(out, SPEC, model, opt, step + n)


def run_linen(n: int, out: str, ckpt: str | None) -> None:
    model, tx = SPEC.build_linen(), optax.sgd(0.05, momentum=0.9)
    template = ftrain.linen_init_state(model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 1)), train=False), tx)
    state, key = template, jax.random.key(7)
    if ckpt:
        _, state, key = train_state.load_linen(ckpt, template)
    step_fn = jax.jit(lambda st, x, y, k: ftrain.linen_train_step(model.apply, tx, st, x, y, k))
    start = int(state.step)
    for s in range(start, start + n):
        x, y = batch(s)
        state, _ = step_fn(state, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(y), key)
    train_state.save_linen(out, SPEC, state, key)


def run_nnx(n: int, out: str, ckpt: str | None) -> None:
    model = SPEC.build_nnx(nnx.Rngs(params=0, dropout=1))
    opt = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    if ckpt:
        train_state.load_nnx(ckpt, model, opt)
    model.train()
    step_fn = nnx.jit(ftrain.nnx_train_step)
    start = int(opt.step[...])
    for s in range(start, start + n):
        x, y = batch(s)
        step_fn(model, opt, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(y))
    train_state.save_nnx(out, SPEC, model, opt)


if __name__ == "__main__":
    framework, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    {"torch": run_torch, "linen": run_linen, "nnx": run_nnx}[framework](
        n, out, sys.argv[4] if len(sys.argv) > 4 else None
    )
