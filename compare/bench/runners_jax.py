"""JAX implementations of the benchmarked training step: the whole step under one jit
with donated state, in every flavour that matters for speed.

* ``jax-linen-jit``: ``jax.jit(linen_train_step, donate_argnums=0)``;
* ``jax-nnx-jit``: ``nnx.jit`` over the model and optimizer (walks the object graph in
  Python on every call);
* ``jax-nnx-cached``: ``nnx.cached_partial(nnx.jit(step), model, optimizer)``: the graph
  traversal of the bound objects is cached, the call still goes through ``nnx.jit``;
* ``jax-nnx-split``: ``nnx.split`` once, ``jax.jit`` over the pure state with
  ``nnx.merge`` inside, the fast NNX pattern from Flax's performance guide;
* ``jax-scan``: K linen steps in one ``jax.lax.scan`` per call (no Python dispatch
  between steps); figures are per step.

Every runner draws fresh dropout masks each step (the step is folded into the key).
``step()`` dispatches asynchronously; ``sync()`` blocks on the outputs and new state.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

import flaxbn.train as ftrain
from compare.conventions import Precision
from compare.registry import ModelSpec

SCAN_STEPS = 10
# How the JAX side's BatchNorm computes the batch variance, per device: its fastest exact
# mode there (flaxbn/batchnorm.py; both are as accurate, tests/test_bn_variance.py). On GPU
# BatchNorm is memory-bound and the one-pass "shifted" sums read the activations once, as
# torch's kernels do; on XLA:CPU the two-pass form measured faster (README, benchmark notes).
BN_VARIANCE = {"gpu": "shifted", "cpu": "two_pass"}


def _data(spec: ModelSpec, batch: int):
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (batch, *spec.flax_input_shape), jnp.float32)
    return x, jax.random.randint(ky, (batch,), 0, spec.config.num_classes)


class LinenRunner:
    steps_per_call = 1

    def __init__(self, spec: ModelSpec, batch: int, dtype: str, device: str, scan_steps: int = 0):
        self.info = {"donated": True, "bn_variance": BN_VARIANCE[device]}
        model = spec.build_linen(compute_dtype=dtype, bn_variance=BN_VARIANCE[device])
        self.x, self.labels = _data(spec, batch)
        variables = model.init(jax.random.key(1), self.x[:2], train=False)
        tx = ftrain.sgd()
        self.state = ftrain.linen_init_state(variables, tx)
        self.key = jax.random.key(2)
        one_step = functools.partial(ftrain.linen_train_step, model.apply, tx)
        if scan_steps:
            self.steps_per_call = scan_steps
            self.info["scan_steps"] = scan_steps

            def many(state, x, labels, key):
                def body(state, _):
                    return one_step(state, x, labels, key)

                return jax.lax.scan(body, state, None, length=scan_steps)

            self.jitted = jax.jit(many, donate_argnums=0)
        else:
            self.jitted = jax.jit(one_step, donate_argnums=0)

    def step(self):
        self.state, loss = self.jitted(self.state, self.x, self.labels, self.key)
        return loss

    def sync(self, out) -> None:
        jax.block_until_ready((self.state, out))

    def lowered(self):
        return self.jitted.lower(self.state, self.x, self.labels, self.key)


class NnxRunner:
    """``pattern``: "jit" (``nnx.jit``), "cached" (``nnx.cached_partial``) or "split"
    (split/merge around ``jax.jit``, state donated)."""

    steps_per_call = 1
    PATTERNS: ClassVar[dict[str, str]] = {
        "jit": "nnx.jit",
        "cached": "nnx.cached_partial + nnx.jit",
        "split": "split/merge + jax.jit",
    }

    def __init__(self, spec: ModelSpec, batch: int, dtype: str, device: str, pattern: str = "jit"):
        if pattern not in self.PATTERNS:
            raise ValueError(f"pattern must be one of {sorted(self.PATTERNS)}, got {pattern!r}")
        self.info = {
            "pattern": self.PATTERNS[pattern],
            "donated": pattern == "split",
            "bn_variance": BN_VARIANCE[device],
        }
        model = spec.build_nnx(nnx.Rngs(params=1, dropout=2), compute_dtype=dtype, bn_variance=BN_VARIANCE[device])
        model.train()
        optimizer = nnx.Optimizer(model, ftrain.sgd(), wrt=nnx.Param)
        self.x, self.labels = _data(spec, batch)
        self.pattern = pattern
        if pattern == "split":
            self.graphdef, self.state = nnx.split((model, optimizer))

            def pure_step(state, x, labels):
                model, optimizer = nnx.merge(self.graphdef, state)
                loss = ftrain.nnx_train_step(model, optimizer, x, labels)
                return nnx.state((model, optimizer)), loss  # RNG counts come back too

            self.jitted = jax.jit(pure_step, donate_argnums=0)
        elif pattern == "cached":
            self.model, self.optimizer = model, optimizer
            self.jitted = nnx.cached_partial(nnx.jit(ftrain.nnx_train_step), model, optimizer)
        else:
            self.model, self.optimizer = model, optimizer
            self.jitted = nnx.jit(ftrain.nnx_train_step)

    def step(self):
        if self.pattern == "split":
            self.state, loss = self.jitted(self.state, self.x, self.labels)
            return loss
        if self.pattern == "cached":
            return self.jitted(self.x, self.labels)
        return self.jitted(self.model, self.optimizer, self.x, self.labels)

    def sync(self, out) -> None:
        jax.block_until_ready((self.state, out) if self.pattern == "split" else (nnx.state(self.model), out))


def implementations() -> dict[str, tuple[type, dict]]:
    return {
        "jax-linen-jit": (LinenRunner, {}),
        "jax-nnx-jit": (NnxRunner, {"pattern": "jit"}),
        "jax-nnx-cached": (NnxRunner, {"pattern": "cached"}),
        "jax-nnx-split": (NnxRunner, {"pattern": "split"}),
        "jax-scan": (LinenRunner, {"scan_steps": SCAN_STEPS}),
    }


def configure(device: str) -> dict:
    if device == "gpu":
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")  # as torch's TF32 setting
        return {"jax_matmul_precision": "tensorfloat32"}
    return {"jax_matmul_precision": "default (cpu: float32)"}


def peak_matmul_tflops(dtype: str, device: str, n: int) -> float:
    import time

    jdtype = Precision(dtype).jax_dtype()
    a = jax.random.normal(jax.random.key(0), (n, n), jdtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jdtype)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e12
