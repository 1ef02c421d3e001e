"""Data parallelism for the Flax models: the batch split over a mesh axis ``"data"`` with
``jax.shard_map``, BatchNorm either synchronised over that axis (a model built with
``bn_axis_name="data"``: statistics of the global batch) or per device (``None``: each
device normalises with its own shard, "ghost" BatchNorm, and keeps its own running
statistics, stored with a leading axis of one entry per device).

The same code runs in one process with simulated devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, or :func:`initialize` with one
process) and in several processes under ``jax.distributed`` (one per host or per GPU):

    parallel.initialize("10.0.0.1:1234", num_processes=2, process_id=i)  # before any jax work
    mesh = parallel.mesh()                          # every device of every process
    state = parallel.linen_state(mesh, variables, tx, "sync")
    step = parallel.linen_step(mesh, model, tx, "sync")
    x = parallel.global_batch(mesh, x_local)        # this process's rows only
    state, loss = step(state, x, parallel.global_batch(mesh, y_local), key)

Each device draws its own dropout masks: the key is folded with ``axis_index("data")``,
the device's position on the mesh, which is its global index whatever the split into
processes (the mesh lists the devices process by process). Without that fold every device
would apply the same mask to its shard, a silent bug (``tests/test_distributed.py`` shows
both). Randomness is always passed in.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flaxbn import train as ftrain

AXIS = "data"
BN_MODES = ("sync", "per_device")


# --- processes, mesh, arrays -------------------------------------------------------------------


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_devices: int | None = None,
    heartbeat_timeout_seconds: int = 100,
    initialization_timeout: int = 300,
) -> None:
    """``jax.distributed.initialize``, before any other jax call. With no arguments the
    cluster is detected (SLURM, Open MPI, Kubernetes, TPU pods); else every process names
    the coordinator (process 0's ``host:port``), the process count and its own id.
    ``cpu_devices``: on CPU, that many local devices per process and gloo collectives
    between processes. ``num_processes == 1`` starts no coordinator (the single-process
    run of the same code)."""
    if cpu_devices is not None:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", cpu_devices)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes == 1:
        return
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout=initialization_timeout,
    )


def mesh(devices: int | None = None) -> jax.sharding.Mesh:
    """A one-axis ``"data"`` mesh over the first ``devices`` global devices (all of them
    by default), in ``jax.devices()`` order: process by process, so a process's devices
    are consecutive and its rows of a global batch are one block."""
    found = jax.devices()
    devices = len(found) if devices is None else devices
    if len(found) < devices:
        raise RuntimeError(
            f"{devices} devices asked, {len(found)} visible: on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} before jax is imported"
        )
    # Auto: jit moves unsharded inputs to the specs shard_map asks for
    return jax.make_mesh((devices,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=found[:devices])


def global_batch(mesh: jax.sharding.Mesh, local: Any) -> Any:
    """The global batch, split over ``"data"``, from this process's rows only (a tree of
    arrays whose leading axis is this process's share: global batch / process count)."""
    sharding = NamedSharding(mesh, P(AXIS))
    return jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local)


def put(mesh: jax.sharding.Mesh, tree: Any, spec: Any = None) -> Any:
    """Host values known to every process (the same seed, or a loaded checkpoint) as
    global arrays laid out by ``spec`` (a ``PartitionSpec``, or a tree of them that is a
    prefix of ``tree``): ``P()`` (the default) replicated, ``P("data")`` one slice per device."""

    def one(s, a):
        sharding = NamedSharding(mesh, s)
        if _is_key(a):  # typed PRNG keys (nnx's Dropout streams) travel as their key data
            data = put(mesh, jax.random.key_data(a), s)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    def subtree(s, sub):
        return jax.tree_util.tree_map(lambda a: one(s, a), sub)

    spec = P() if spec is None else spec
    return jax.tree_util.tree_map(subtree, spec, tree, is_leaf=lambda s: isinstance(s, P))


def to_host(tree: Any) -> Any:
    """Global arrays as numpy, on every process. A collective when a leaf is split across
    processes (every process must call it): all such leaves are gathered by one compiled
    program; a replicated or local leaf is read where it is. Typed PRNG keys stay keys."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = {i: jax.random.key_impl(a) for i, a in enumerate(leaves) if _is_key(a)}
    leaves = [jax.random.key_data(a) if i in keys else a for i, a in enumerate(leaves)]
    split = [i for i, a in enumerate(leaves) if isinstance(a, jax.Array) and not a.is_fully_addressable]
    split = [i for i in split if not leaves[i].sharding.is_fully_replicated]
    if split:
        replicated = NamedSharding(leaves[split[0]].sharding.mesh, P())
        gathered = jax.jit(lambda *xs: xs, out_shardings=replicated)(*[leaves[i] for i in split])
        for i, a in zip(split, gathered, strict=True):
            leaves[i] = a

    def host(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(a.addressable_data(0))
        return np.asarray(a)

    leaves = [host(a) for a in leaves]
    leaves = [jax.random.wrap_key_data(a, impl=keys[i]) if i in keys else a for i, a in enumerate(leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _is_key(a) -> bool:
    return isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def per_device(tree: Any, devices: int) -> Any:
    """Host statistics copied for every device: a leading axis of ``devices`` entries."""
    return jax.tree_util.tree_map(lambda a: np.broadcast_to(np.asarray(a), (devices, *np.shape(a))).copy(), tree)


def device_key(key: jax.Array) -> jax.Array:
    """Inside ``shard_map``: this device's key, folded with its global index on the mesh."""
    return jax.random.fold_in(key, jax.lax.axis_index(AXIS))


def _stack(tree):
    """Inside shard_map: a leading axis of 1, so that out_specs P('data') stacks the devices' values."""
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def _unstack(tree):
    return jax.tree_util.tree_map(lambda a: a[0], tree)


def _check_mode(bn_mode: str) -> None:
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")


# --- one forward and backward (the checks) -----------------------------------------------------


def linen_forward_backward(
    model: nn.Module, variables: dict, x, y, devices: int | jax.sharding.Mesh, key: jax.Array, *, fold_device_into_key: bool = True
):  # fmt: skip
    """One train-mode forward and backward of the global batch ``x`` (Flax layout) split
    over ``devices`` (a count or a mesh). ``model``'s ``bn_axis_name`` decides the
    statistics ("data": synchronised, None: per device). Returns (logits of the global
    batch, mean gradients, batch_stats per device with a leading devices axis).
    ``fold_device_into_key=False`` reproduces the bug of one dropout mask on every device."""
    m = _mesh(devices)
    params, stats = _placed(m, (variables["params"], variables["batch_stats"]), P())
    return _linen_fb(model, m, fold_device_into_key)(params, stats, *_placed(m, (x, y), P(AXIS)), _placed(m, key, P()))


@functools.cache
def _linen_fb(model: nn.Module, m: jax.sharding.Mesh, fold: bool):
    """The jitted function of :func:`linen_forward_backward`, built once per model and mesh."""

    def local(params, batch_stats, x, y, key):
        if fold:
            key = device_key(key)  # each device its own masks
        (_loss, (logits, stats)), grads = ftrain.linen_loss_and_grads(model.apply, params, batch_stats, x, y, key)
        grads = jax.lax.pmean(grads, AXIS)  # the global mean loss: shards are equal-sized
        return logits, grads, _stack(stats)

    specs = dict(in_specs=(P(), P(), P(AXIS), P(AXIS), P()), out_specs=(P(AXIS), P(), P(AXIS)))
    return jax.jit(jax.shard_map(local, mesh=m, check_vma=False, **specs))


def nnx_forward_backward(model: nnx.Module, x, y, devices: int | jax.sharding.Mesh):
    """The same with an nnx model (built with the chosen ``bn_axis_name``), split once and
    merged inside ``shard_map``; the model itself is not changed."""
    graphdef, state = nnx.split(model)
    m = _mesh(devices)
    return _nnx_fb(graphdef, m)(_placed(m, state, P()), *_placed(m, (x, y), P(AXIS)))


@functools.cache
def _nnx_fb(graphdef, m: jax.sharding.Mesh):
    def local(state, x, y):
        model = nnx.merge(graphdef, state)
        model.train()
        (_loss, logits), grads = ftrain.nnx_loss_and_grads(model, x, y)
        grads = jax.lax.pmean(nnx.to_pure_dict(grads), AXIS)
        stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
        return logits, grads, _stack(stats)

    specs = dict(in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(AXIS), P(), P(AXIS)))
    return jax.jit(jax.shard_map(local, mesh=m, check_vma=False, **specs))


def _mesh(devices: int | jax.sharding.Mesh) -> jax.sharding.Mesh:
    return devices if isinstance(devices, jax.sharding.Mesh) else mesh(devices)


def _placed(m: jax.sharding.Mesh, tree: Any, spec: P) -> Any:
    """Leaves already laid out on ``m`` stay; host values (the same on every process) are :func:`put`."""

    def one(a):
        on_mesh = isinstance(a, jax.Array) and isinstance(a.sharding, NamedSharding) and a.sharding.mesh == m
        return a if on_mesh else put(m, a, spec)

    return jax.tree_util.tree_map(one, tree)


# --- training steps ----------------------------------------------------------------------------


def linen_state(mesh: jax.sharding.Mesh, variables: dict, tx, bn_mode: str) -> ftrain.LinenState:
    """The initial ``LinenState`` on the mesh (see :func:`linen_place`)."""
    _check_mode(bn_mode)
    state = ftrain.linen_init_state(variables, tx)
    if bn_mode == "per_device":
        state = state.replace(batch_stats=per_device(state.batch_stats, mesh.size))
    return linen_place(mesh, state, bn_mode)


def linen_place(mesh: jax.sharding.Mesh, state: ftrain.LinenState, bn_mode: str) -> ftrain.LinenState:
    """A host ``LinenState`` (the same on every process: built from one seed, or loaded)
    on the mesh: replicated, except per-device statistics (a leading axis of one entry per
    device), which are split over ``"data"``."""
    _check_mode(bn_mode)
    return put(mesh, state, linen_specs(bn_mode))


def linen_specs(bn_mode: str) -> ftrain.LinenState:
    """The layout of a ``LinenState`` on the mesh: everything replicated, per-device statistics split."""
    return ftrain.LinenState(P(), P(AXIS) if bn_mode == "per_device" else P(), P(), P())


def linen_step(mesh: jax.sharding.Mesh, model: nn.Module, tx, bn_mode: str):
    """The jitted data-parallel step ``(state, x, y, key) -> (state, mean loss)``: every
    device runs ``flaxbn.train``'s forward and backward on its shard with its own dropout
    key (``fold_in(fold_in(key, step), device)``), the gradients are averaged over the
    devices, then the optimizer updates the replicated parameters. ``model`` is built with
    ``bn_axis_name="data"`` for ``"sync"`` and without for ``"per_device"``. ``state`` is
    donated."""
    _check_mode(bn_mode)
    if (model.cfg.bn_axis_name == AXIS) != (bn_mode == "sync"):
        raise ValueError(
            f"bn_mode {bn_mode!r} needs a model built with bn_axis_name={AXIS if bn_mode == 'sync' else None!r}"
        )

    def local(state, x, y, key):
        stats = _unstack(state.batch_stats) if bn_mode == "per_device" else state.batch_stats
        step_key = device_key(jax.random.fold_in(key, state.step))
        (loss, (_, stats)), grads = ftrain.linen_loss_and_grads(model.apply, state.params, stats, x, y, step_key)
        grads, loss = jax.lax.pmean((grads, loss), AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats = _stack(stats) if bn_mode == "per_device" else stats
        return ftrain.LinenState(params, stats, opt_state, state.step + 1), loss

    specs = linen_specs(bn_mode)
    run = jax.shard_map(
        local, mesh=mesh, in_specs=(specs, P(AXIS), P(AXIS), P()), out_specs=(specs, P()), check_vma=False
    )
    return jax.jit(run, donate_argnums=0)


def nnx_state(mesh: jax.sharding.Mesh, model: nnx.Module, optimizer: nnx.Optimizer, bn_mode: str):
    """``(graphdef, (stats, rest))`` of an nnx model and its optimizer on the mesh (see
    :func:`nnx_place`)."""
    _check_mode(bn_mode)
    graphdef, stats, rest = nnx.split((model, optimizer), nnx.BatchStat, ...)
    if bn_mode == "per_device":
        stats = per_device(stats, mesh.size)
    return graphdef, nnx_place(mesh, (stats, rest), bn_mode)


def nnx_place(mesh: jax.sharding.Mesh, state, bn_mode: str):
    """A host ``(stats, rest)`` state on the mesh: the BatchStats (per device with a leading
    axis, split over ``"data"``, for ``"per_device"``) and everything else (parameters,
    optimizer state, the Dropout streams) replicated."""
    _check_mode(bn_mode)
    stats, rest = state
    return put(mesh, stats, P(AXIS) if bn_mode == "per_device" else P()), put(mesh, rest)


def nnx_step(mesh: jax.sharding.Mesh, graphdef, bn_mode: str):
    """The jitted data-parallel nnx step ``(state, x, y) -> (state, mean loss)`` over the
    state of :func:`nnx_state`: ``nnx.merge`` inside ``shard_map``, each Dropout stream's key
    folded with the device index for the step (its count advances as usual), gradients
    averaged, ``optimizer.update``. ``state`` is donated."""
    _check_mode(bn_mode)

    def local(state, x, y):
        stats, rest = state
        stats = _unstack(stats) if bn_mode == "per_device" else stats
        model, optimizer = nnx.merge(graphdef, stats, rest)
        model.train()
        # a copy: nnx.state's Variables are the model's own, so the update below would change `keys` too
        keys = jax.tree_util.tree_map(lambda k: k, nnx.state(model, nnx.RngKey))
        nnx.update(model, jax.tree_util.tree_map(device_key, keys))
        (loss, _), grads = ftrain.nnx_loss_and_grads(model, x, y)
        optimizer.update(model, jax.lax.pmean(grads, AXIS))
        nnx.update(model, keys)  # the shared stream keys back; their counts have advanced
        _, stats, rest = nnx.split((model, optimizer), nnx.BatchStat, ...)
        stats = _stack(stats) if bn_mode == "per_device" else stats
        return (stats, rest), jax.lax.pmean(loss, AXIS)

    stats_spec = P(AXIS) if bn_mode == "per_device" else P()
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=((stats_spec, P()), P(AXIS), P(AXIS)),
        out_specs=((stats_spec, P()), P()),
        check_vma=False,
    )
    return jax.jit(run, donate_argnums=0)


def nnx_merge(graphdef, state, bn_mode: str, device: int = 0) -> tuple[nnx.Module, nnx.Optimizer]:
    """The model and optimizer on the host (a collective: every process calls it), with
    the statistics of global device ``device`` when they are per device."""
    stats, rest = to_host(state)
    if bn_mode == "per_device":
        stats = jax.tree_util.tree_map(lambda a: a[device], stats)
    return nnx.merge(graphdef, stats, rest)


# --- whole runs in one process (the simulated-device checks) -----------------------------------


def linen_train(
    model: nn.Module, variables: dict, tx, batches: Iterable, devices: int, key: jax.Array
) -> ftrain.LinenState:
    """Data-parallel training with synchronised BatchNorm (``model`` built with
    ``bn_axis_name="data"``): every step takes a global batch, splits it, averages the
    gradients. ``devices=1`` without a mesh is the single-device reference. Returns the
    final state (on the host)."""
    if devices == 1:
        step = jax.jit(lambda s, x, y: ftrain.linen_train_step(model.apply, tx, s, x, y, key))
        state = ftrain.linen_init_state(variables, tx)
        for x, y in batches:
            state, _ = step(state, x, y)
        return state
    if model.cfg.bn_axis_name != AXIS:
        raise ValueError(f"linen_train keeps one set of running statistics: build the model with bn_axis_name={AXIS!r}")
    m = mesh(devices)
    state, step = linen_state(m, variables, tx, "sync"), linen_step(m, model, tx, "sync")
    for x, y in batches:
        state, _ = step(state, put(m, x, P(AXIS)), put(m, y, P(AXIS)), key)
    return to_host(state)


def nnx_train(model: nnx.Module, optimizer: nnx.Optimizer, batches: Iterable, devices: int) -> None:
    """Data-parallel nnx training in place (model built with ``bn_axis_name="data"`` for
    synchronised statistics), through :func:`nnx_step`."""
    m = mesh(devices)
    graphdef, state = nnx_state(m, model, optimizer, "sync")
    step = nnx_step(m, graphdef, "sync")
    for x, y in batches:
        state, _ = step(state, put(m, x, P(AXIS)), put(m, y, P(AXIS)))
    stats, rest = to_host(state)
    nnx.update((model, optimizer), stats, rest)
