"""The Flax training and evaluation steps, linen and nnx: cross-entropy, gradients, optax
update, BatchNorm statistics updated; and the one optimizer definition (:func:`sgd`). The
twin of ``torchbn/train.py``; the benchmark, the data-parallel checks and the experiments
all train through these.

linen is functional: the step takes the state and returns the new one, and passes
``mutable=["batch_stats"]`` in training. The dropout key is the step's own
(``fold_in(key, step)``): the same key would give the same mask every step. nnx updates
the model and optimizer in place (``nnx.jit`` carries the state and the RNG counts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import optax
from flax import nnx


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of (N, K) logits against (N,) integer labels, in float32
    (bfloat16 logits are upcast first, as torch's autocast does for cross_entropy)."""
    logits = logits.astype(jax.numpy.promote_types(logits.dtype, jax.numpy.float32))  # bf16 -> f32, f64 stays
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@flax.struct.dataclass
class LinenState:
    """Everything a linen training run carries from step to step."""

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array


def linen_init_state(variables: dict, tx: optax.GradientTransformation) -> LinenState:
    params = variables["params"]
    return LinenState(params, variables.get("batch_stats", {}), tx.init(params), jax.numpy.zeros((), jax.numpy.int32))


def linen_loss_and_grads(apply_fn: Callable, params, batch_stats, x: jax.Array, labels: jax.Array, key: jax.Array):
    """Returns ``((loss, (logits, new_batch_stats)), grads)`` of one train-mode forward."""

    def loss_fn(params):
        logits, updates = apply_fn(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return cross_entropy(logits, labels), (logits, updates["batch_stats"])

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def linen_train_step(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    state: LinenState,
    x: jax.Array,
    labels: jax.Array,
    key: jax.Array,
) -> tuple[LinenState, jax.Array]:
    """One training step; jit it with ``jax.jit(partial(linen_train_step, apply_fn, tx),
    donate_argnums=0)``. ``key`` is the run's dropout key; the step is folded in."""
    step_key = jax.random.fold_in(key, state.step)
    (loss, (_, batch_stats)), grads = linen_loss_and_grads(
        apply_fn, state.params, state.batch_stats, x, labels, step_key
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return LinenState(params, batch_stats, opt_state, state.step + 1), loss


def linen_eval_step(apply_fn: Callable, state: LinenState, x: jax.Array, labels: jax.Array):
    """Eval-mode loss and accuracy (running statistics, no Dropout, nothing updated: no
    ``mutable``, no rng); jit it."""
    logits = apply_fn({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
    return cross_entropy(logits, labels), jax.numpy.mean(jax.numpy.argmax(logits, -1) == labels)


def nnx_loss_and_grads(model: nnx.Module, x: jax.Array, labels: jax.Array):
    """Returns ``((loss, logits), grads)``; the model's BatchStats and RNG counts advance."""

    def loss_fn(model):
        logits = model(x)
        return cross_entropy(logits, labels), logits

    return nnx.value_and_grad(loss_fn, has_aux=True)(model)


def nnx_train_step(model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, labels: jax.Array) -> jax.Array:
    """One training step in place; wrap it in ``nnx.jit`` (or ``nnx.cached_partial``)."""
    (loss, _), grads = nnx_loss_and_grads(model, x, labels)
    optimizer.update(model, grads)
    return loss


def nnx_eval_step(model: nnx.Module, x: jax.Array, labels: jax.Array):
    """Eval-mode loss and accuracy; the model is switched to eval mode (``model.eval()``)
    and nothing is updated. Wrap it in ``nnx.jit``."""
    model.eval()
    logits = model(x)
    return cross_entropy(logits, labels), jax.numpy.mean(jax.numpy.argmax(logits, -1) == labels)


def sgd(lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False):
    """torch's SGD in optax: weight decay as L2 on the gradient, then the momentum trace.
    The defaults (lr 0.1, momentum 0.9) are the benchmark's."""
    sgd_ = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
    return optax.chain(optax.add_decayed_weights(weight_decay), sgd_) if weight_decay else sgd_
