"""Training checkpoints of a data-parallel run: one writer, atomic, and a header that
says whose BatchNorm statistics they hold.

The files are ``compare.io.train_state``'s (same format, kinds and keys), written by
process 0 (rank 0) only through ``compare.io.checkpoint.write_arrays``: a temporary file,
fsynced, renamed over the last one, so a run killed at any moment leaves the previous
checkpoint whole. Every process calls the ``save_*`` functions (gathering a statistic
split across processes is a collective); only the first writes. The header's
``parallel`` entry is a JSON object: ``bn_mode``, ``devices``, ``processes`` and
``statistics``, what the statistics are:

* ``sync``: the same on every device; one copy. The file is a plain training checkpoint
  (``train_state.load_linen``/``load_nnx``/``load_torch`` read it) and resumes on any
  number of processes and devices: the global batch's statistics do not depend on the split.
* ``per_device`` (JAX): every device's own, with a leading axis in global device order (the
  mesh's). A resume on as many devices, however they are split into processes, gives each
  device its own back. On another device count there is no right answer, so the loader
  asks: ``resplit="device0"`` starts every device from device 0's statistics (what
  ``DistributedDataParallel`` does at every forward with rank 0's buffers), ``"mean"`` from
  their average; without it, it refuses and names both.
* ``per_device`` (torch DDP): rank 0's buffers, which DDP broadcasts to every rank at the
  start of the next forward anyway; any resume starts every rank from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

import flaxbn.train as ftrain
from compare import transfer
from compare.io import train_state
from compare.io.checkpoint import CheckpointError, read_arrays, read_metadata, spec_metadata, write_arrays
from compare.registry import ModelSpec
from flaxbn import parallel

RESPLITS = ("device0", "mean")


def statistics(framework: str, bn_mode: str, devices: int) -> str:
    """What a checkpoint's BatchNorm statistics are, in words."""
    if bn_mode == "sync":
        return "the global batch's (the same on every device): one copy"
    if framework == "torch":
        return "rank 0's buffers (DistributedDataParallel broadcasts them at every forward)"
    return f"every device's own: leading axis = global device index 0..{devices - 1} (mesh order)"


def _parallel_header(framework: str, bn_mode: str, devices: int, processes: int) -> dict[str, str]:
    info = {"bn_mode": bn_mode, "devices": devices, "processes": processes}
    return {"parallel": json.dumps({**info, "statistics": statistics(framework, bn_mode, devices)})}


def info(path: str | Path) -> dict[str, Any]:
    """The ``parallel`` header entry of a checkpoint (``bn_mode``, ``devices``, ...)."""
    header = read_metadata(path)
    try:
        found = json.loads(header["parallel"])
        assert isinstance(found, dict) and found.get("bn_mode") in parallel.BN_MODES and int(found["devices"]) >= 1
    except (KeyError, ValueError, TypeError, AssertionError):
        raise CheckpointError(f"{path}: not a data-parallel checkpoint (no valid 'parallel' header entry)") from None
    return found


def _replicas_agree(path: Path, tree: Any) -> None:
    """Every replicated leaf holds the same value on each of this process's devices: a
    state that claims replication but differs per device would be saved as device 0's."""
    for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(leaf, jax.Array) or not leaf.sharding.is_fully_replicated:
            continue
        shards = [s.data for s in leaf.addressable_shards]
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            shards = [jax.random.key_data(s) for s in shards]
        first = np.asarray(shards[0])
        if any(not np.array_equal(np.asarray(s), first, equal_nan=True) for s in shards[1:]):
            raise CheckpointError(f"{path}: {jax.tree_util.keystr(key)} is replicated but differs between devices")


def _write(path: Path, arrays: dict[str, np.ndarray], header: dict[str, str]) -> None:
    if jax.process_index() == 0:  # one writer; write_arrays replaces the file atomically
        write_arrays(path, arrays, header)


def _resplit(path: Path, stats: Any, saved: int, devices: int, resplit: str | None) -> Any:
    if saved == devices:
        return stats
    if resplit not in RESPLITS:
        raise CheckpointError(
            f"{path}: per-device BatchNorm statistics of {saved} devices, resumed on {devices}: pass "
            "resplit='device0' (every device starts from device 0's, as DDP's buffer broadcast does) "
            "or resplit='mean' (from the average of all devices')"
        )
    first = resplit == "device0"
    picked = jax.tree_util.tree_map(
        lambda a: a[0] if first or a.dtype.kind != "f" else a.mean(0).astype(a.dtype), stats
    )
    return parallel.per_device(picked, devices)


# --- linen --------------------------------------------------------------------------------------


def save_linen(
    path: str | Path, spec: ModelSpec, mesh: jax.sharding.Mesh, state: ftrain.LinenState, key: jax.Array, bn_mode: str
) -> None:
    """Called by every process; process 0 writes ``state`` (global arrays) and the run's dropout key."""
    _replicas_agree(Path(path), state)
    host = parallel.to_host(state)
    arrays = {
        "state" + jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(host)[0]
    }
    arrays["rng/key"] = np.asarray(jax.random.key_data(key))
    header = {
        "format": train_state.FORMAT,
        "kind": "linen",
        **spec_metadata(spec),
        "key_impl": json.dumps(str(jax.random.key_impl(key))),
        **_parallel_header("linen", bn_mode, mesh.size, jax.process_count()),
    }
    _write(Path(path), arrays, header)


def load_linen(
    path: str | Path, template: ftrain.LinenState, devices: int, resplit: str | None = None
) -> tuple[ModelSpec, ftrain.LinenState, jax.Array, dict]:
    """(spec, state on the host, dropout key, header info) for a run on ``devices``
    devices; ``template`` is a single-device state of the same model and optimizer
    (``linen_init_state``). Per-device statistics are given one entry per device."""
    found = info(path)
    saved = int(found["devices"])
    if found["bn_mode"] == "per_device":
        template = template.replace(batch_stats=parallel.per_device(template.batch_stats, saved))
    spec, state, key = train_state.load_linen(path, template)
    if found["bn_mode"] == "per_device":
        state = state.replace(batch_stats=_resplit(Path(path), state.batch_stats, saved, devices, resplit))
    return spec, state, key, found


# --- nnx ----------------------------------------------------------------------------------------


def _nnx_flat(state: Any) -> dict[str, tuple[tuple, Any]]:
    return {"/".join(map(str, p)): (p, v) for part in state for p, v in nnx.to_flat_state(part)}


def _value(var: Any) -> np.ndarray:
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    is_key = jax.dtypes.issubdtype(getattr(value, "dtype", np.float32), jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(value)) if is_key else np.asarray(value)


def save_nnx(path: str | Path, spec: ModelSpec, mesh: jax.sharding.Mesh, state: Any, bn_mode: str) -> None:
    """Called by every process with the ``(stats, rest)`` state of ``parallel.nnx_state``;
    process 0 writes it (with per-device statistics, every device's)."""
    _replicas_agree(Path(path), state)
    host = parallel.to_host(state)
    arrays = {k: _value(v) for k, (_, v) in _nnx_flat(host).items()}
    header = {"format": train_state.FORMAT, "kind": "nnx", **spec_metadata(spec)}
    _write(Path(path), arrays, {**header, **_parallel_header("nnx", bn_mode, mesh.size, jax.process_count())})


def load_nnx(path: str | Path, template: Any, devices: int, resplit: str | None = None) -> tuple[Any, dict]:
    """The ``(stats, rest)`` state on the host, checked key by key against ``template``
    (the single-device ``(stats, rest)`` of ``nnx.split((model, optimizer), nnx.BatchStat, ...)``
    of the same model and optimizer), and the header info."""
    path = Path(path)
    found = info(path)
    saved = int(found["devices"])
    stats, rest = template
    if found["bn_mode"] == "per_device":
        stats = parallel.per_device(stats, saved)
    arrays, header = read_arrays(path)
    if header.get("format") != train_state.FORMAT or header.get("kind") != "nnx":
        raise CheckpointError(f"{path}: not an nnx training checkpoint")
    want = {k: _value(v) for k, (_, v) in _nnx_flat((stats, rest)).items()}
    problems = transfer.validate(arrays, {k: (v.shape, str(v.dtype)) for k, v in want.items()}, True)
    if problems:
        raise CheckpointError(f"{path}: does not fit the model and optimizer: " + "; ".join(problems))
    parts = []
    for part in (stats, rest):
        updates = []
        for p, var in nnx.to_flat_state(part):
            value = arrays["/".join(map(str, p))]
            if isinstance(var, nnx.RngKey):
                value = jax.random.wrap_key_data(value, impl=jax.random.key_impl(var.get_value()))
            updates.append((p, var.replace(value)))
        parts.append(nnx.from_flat_state(updates))
    stats, rest = parts
    if found["bn_mode"] == "per_device":
        stats = _resplit(path, stats, saved, devices, resplit)
    return (stats, rest), found


# --- torch --------------------------------------------------------------------------------------


def save_torch(path: str | Path, spec: ModelSpec, model, optimizer, step: int, bn_mode: str) -> None:
    """Called by every rank; rank 0 writes ``train_state.save_torch``'s checkpoint of the
    unwrapped ``model`` (its buffers: rank 0's) with the ``parallel`` header entry."""
    import torch.distributed as dist

    if dist.get_rank() != 0:
        return
    path = Path(path)
    plain = path.with_name(f".{path.name}.plain")  # beside it: the final write stays one rename
    train_state.save_torch(plain, spec, model, optimizer, step)
    arrays, header = read_arrays(plain)
    write_arrays(
        path, arrays, {**header, **_parallel_header("torch", bn_mode, dist.get_world_size(), dist.get_world_size())}
    )
    plain.unlink()
