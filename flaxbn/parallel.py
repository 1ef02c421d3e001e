"""Data parallelism for the Flax models: the batch split over a mesh axis ``"data"`` with
``jax.shard_map``, BatchNorm either synchronised over that axis (a model built with
``bn_axis_name="data"``: statistics of the global batch) or per device (``None``: each
device normalises with its own shard, "ghost" BatchNorm, and keeps its own running
statistics).

Each device draws its own dropout masks: the key is folded with ``axis_index("data")``.
Without that fold every device would apply the same mask to its shard, a silent bug
(``tests/test_distributed.py`` shows both). Randomness is always passed in.

Runs on any device set, CPU included (``XLA_FLAGS=--xla_force_host_platform_device_count=8``
set before jax starts simulates 8 devices).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import optax
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

from flaxbn import train as ftrain

AXIS = "data"


def mesh(devices: int) -> jax.sharding.Mesh:
    """A one-axis ``"data"`` mesh over the first ``devices`` devices."""
    if len(jax.devices()) < devices:
        raise RuntimeError(
            f"{devices} devices asked, {len(jax.devices())} visible: on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax is imported"
        )
    # Auto: jit moves unsharded inputs to the specs shard_map asks for
    return jax.make_mesh((devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:devices])


def _per_device(tree):
    """Inside shard_map: give every leaf a leading axis of 1, so out_specs P('data')
    stacks the devices' values into (devices, ...)."""
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def linen_forward_backward(
    model: nn.Module, variables: dict, x, y, devices: int, key: jax.Array, *, fold_device_into_key: bool = True
):
    """One train-mode forward and backward of the global batch ``x`` (Flax layout) split
    over ``devices``. ``model``'s ``bn_axis_name`` decides the statistics ("data":
    synchronised, None: per device). Returns (logits of the global batch, mean gradients,
    batch_stats per device with a leading devices axis). ``fold_device_into_key=False``
    reproduces the bug of one dropout mask on every device."""

    def local(params, batch_stats, x, y, key):
        if fold_device_into_key:
            key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))  # each device its own masks
        (_loss, (logits, stats)), grads = ftrain.linen_loss_and_grads(model.apply, params, batch_stats, x, y, key)
        grads = jax.lax.pmean(grads, AXIS)  # the global mean loss: shards are equal-sized
        return logits, grads, _per_device(stats)

    run = jax.shard_map(
        local,
        mesh=mesh(devices),
        in_specs=(P(), P(), P(AXIS), P(AXIS), P()),
        out_specs=(P(AXIS), P(), P(AXIS)),
        check_vma=False,
    )
    return jax.jit(run)(variables["params"], variables["batch_stats"], x, y, key)


def nnx_forward_backward(model: nnx.Module, x, y, devices: int):
    """The same with an nnx model (built with the chosen ``bn_axis_name``), split once and
    merged inside ``shard_map``; the model itself is not changed."""
    graphdef, state = nnx.split(model)

    def local(state, x, y):
        model = nnx.merge(graphdef, state)
        model.train()
        (_loss, logits), grads = ftrain.nnx_loss_and_grads(model, x, y)
        grads = jax.lax.pmean(nnx.to_pure_dict(grads), AXIS)
        stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return logits, grads, _per_device(stats)

    run = jax.shard_map(
        local, mesh=mesh(devices), in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(AXIS), P(), P(AXIS)), check_vma=False
    )
    return jax.jit(run)(state, x, y)


def linen_train(
    model: nn.Module, variables: dict, tx: optax.GradientTransformation, batches: Iterable, devices: int, key: jax.Array
) -> ftrain.LinenState:
    """Data-parallel training with synchronised BatchNorm (``model`` built with
    ``bn_axis_name="data"``): every step takes a global batch, splits it, averages the
    gradients. ``devices=1`` without a mesh is the single-device reference. Returns the
    final state."""
    state = ftrain.linen_init_state(variables, tx)
    if devices == 1:
        step = jax.jit(functools.partial(ftrain.linen_train_step, model.apply, tx))
        for x, y in batches:
            state, _ = step(state, x, y, key)
        return state
    if model.cfg.bn_axis_name != AXIS:
        raise ValueError(f"linen_train keeps one set of running statistics: build the model with bn_axis_name={AXIS!r}")

    def local(state, x, y, key):
        step_key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(AXIS))
        (loss, (_, stats)), grads = ftrain.linen_loss_and_grads(
            model.apply, state.params, state.batch_stats, x, y, step_key
        )
        grads, loss = jax.lax.pmean((grads, loss), AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return ftrain.LinenState(params, stats, opt_state, state.step + 1), loss

    step = jax.jit(
        jax.shard_map(
            local, mesh=mesh(devices), in_specs=(P(), P(AXIS), P(AXIS), P()), out_specs=(P(), P()), check_vma=False
        )
    )
    for x, y in batches:
        state, _ = step(state, x, y, key)
    return state


def nnx_train(model: nnx.Module, optimizer: nnx.Optimizer, batches: Iterable, devices: int) -> None:
    """Data-parallel nnx training in place (model built with ``bn_axis_name="data"`` for
    synchronised statistics): split once, ``shard_map`` over the pure state with
    ``nnx.merge`` inside. Each device folds its index into every dropout stream's key for
    the step, so the masks differ between devices; the streams' counts advance as usual."""
    graphdef, state = nnx.split((model, optimizer))

    def local(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        keys = nnx.state(model, nnx.RngKey)
        device_keys = jax.tree_util.tree_map(lambda k: jax.random.fold_in(k, jax.lax.axis_index(AXIS)), keys)
        nnx.update(model, device_keys)
        (loss, _), grads = ftrain.nnx_loss_and_grads(model, x, y)
        grads = jax.lax.pmean(grads, AXIS)
        optimizer.update(model, grads)
        nnx.update(model, keys)  # the shared stream keys back; their counts have advanced
        return nnx.state((model, optimizer)), jax.lax.pmean(loss, AXIS)

    step = jax.jit(
        jax.shard_map(
            local, mesh=mesh(devices), in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()), check_vma=False
        )
    )
    for x, y in batches:
        state, _ = step(state, x, y)
    nnx.update((model, optimizer), state)
