"""The JAX data-parallel checks (the library is ``flaxbn.parallel``): synchronised
BatchNorm against one device with the global batch, per-device BatchNorm against each
shard alone, data-parallel training against the single-device run, per-device dropout
masks drawn from the global device index, and Flax's equal-weight statistics over
uneven (padded and masked) shards; in linen and nnx.

The same checks run on any global mesh: one process with simulated CPU devices
(:func:`run_in_subprocess`, the device count is fixed when jax starts) or several processes
under ``jax.distributed`` (``compare.parallel.jax_worker``). Every process feeds only its
own rows (``parallel.global_batch``); the references are computed on process 0 alone,
which returns the records (the other processes return none).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

import flaxbn.train as ftrain
from compare import registry, transfer
from compare.checks import diffs, tolerances
from compare.parallel import uneven_shards
from compare.records import DistributedRecord
from flaxbn import parallel
from flaxbn.batchnorm import LinenBatchNorm
from flaxbn.parallel import AXIS

TOL = {name: tolerances.get(f"parallel.{name}") for name in ("logits", "grads", "stats", "train")}
SHARD = 8  # rows per device


@dataclasses.dataclass(frozen=True)
class Where:
    """The mesh the checks run on and how its devices were started."""

    mesh: jax.sharding.Mesh
    processes: int
    launcher: str  # "simulated" (one process) | "jax.distributed"

    @property
    def devices(self) -> int:
        return self.mesh.size

    @property
    def first(self) -> bool:
        return jax.process_index() == 0


def where(devices: int | None = None, launcher: str = "simulated") -> Where:
    return Where(parallel.mesh(devices), jax.process_count(), launcher)


@functools.cache
def _setup(name: str, batch: int, dropout: float = 0.0):
    """(spec, linen variables, x, y) of a small ``name``; the same for every process."""
    base = {
        "mlp": registry.get("mlp").replace(in_features=12, hidden=(16, 8)),
        "cnn": registry.get("cnn").replace(in_channels=2, image_size=8, channels=(4, 8), hidden=16, dropout2d=dropout),
    }[name].replace(dropout=dropout)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((batch, *base.flax_input_shape), dtype=np.float32) * 2 + 0.5).astype(np.float32)
    y = rng.integers(0, base.config.num_classes, batch).astype(np.int32)
    variables = jax.jit(lambda k, x: base.build_linen().init(k, x, train=False))(jax.random.key(1), x[:2])
    return base, variables, x, y


@functools.cache
def _loss_and_grads(model):
    """``flaxbn.train.linen_loss_and_grads`` of ``model``, jitted: one compilation, not one per operation."""
    return jax.jit(lambda p, s, x, y, k: ftrain.linen_loss_and_grads(model.apply, p, s, x, y, k))


def rows(w: Where, a: np.ndarray) -> np.ndarray:
    """This process's rows of a global batch: its devices' shards, in mesh order."""
    shard = a.shape[0] // w.devices
    mine = [i for i, d in enumerate(w.mesh.devices.flat) if d.process_index == jax.process_index()]
    return np.concatenate([a[i * shard : (i + 1) * shard] for i in mine])


def _global(w: Where, *arrays: np.ndarray):
    return tuple(parallel.global_batch(w.mesh, rows(w, a)) for a in arrays)


def _record(w: Where, framework: str, bn_mode: str, check: str, got, want, tol: str) -> dict:
    d = diffs.tree_diff(got, want)
    t = TOL[tol]
    return DistributedRecord(
        framework=framework,
        devices=w.devices,
        bn_mode=bn_mode,
        check=check,
        max_abs_diff=d.max_abs,
        tol=t.bound(d.scale),
        ok=t.holds(d.max_abs, d.scale),
        processes=w.processes,
        launcher=w.launcher,
    ).to_dict()


def _control(w: Where, check: str, a, b, *, differ: bool, bn_mode: str = "per_device") -> dict:
    """A control record: holds when ``a`` and ``b`` differ by more than 1e-3 (``differ``)
    or are exactly equal (not ``differ``)."""
    d = diffs.max_abs(a, b)
    return DistributedRecord(
        framework="linen",
        devices=w.devices,
        bn_mode=bn_mode,
        check=check,
        max_abs_diff=d,
        tol=1e-3 if differ else 0.0,
        ok=d > 1e-3 if differ else d == 0.0,
        processes=w.processes,
        launcher=w.launcher,
    ).to_dict()


def _nnx_from(spec: registry.ModelSpec, variables: dict, bn_axis_name: str | None) -> nnx.Module:
    """The nnx twin of ``spec`` holding ``variables``, in train mode (a fresh copy each call)."""
    graphdef, state = _nnx_built(spec, bn_axis_name)
    model = nnx.merge(graphdef, state)
    transfer.linen_to_nnx(variables, spec, model)
    model.train()
    return model


@functools.cache
def _nnx_built(spec: registry.ModelSpec, bn_axis_name: str | None):
    # built under jit: one compilation instead of one per initializer
    return nnx.split(nnx.jit(lambda: spec.build_nnx(nnx.Rngs(params=0, dropout=1), bn_axis_name=bn_axis_name))())


def synchronised(w: Where, name: str) -> list[dict]:
    """Synchronised BatchNorm equals one device with the global batch (linen and nnx)."""
    spec, variables, x, y = _setup(name, SHARD * w.devices)
    key = jax.random.key(0)
    gx, gy = _global(w, x, y)
    out = parallel.linen_forward_backward(spec.build_linen(bn_axis_name=AXIS), variables, gx, gy, w.mesh, key)
    logits, grads, stats = parallel.to_host(out)
    n_logits = parallel.to_host(parallel.nnx_forward_backward(_nnx_from(spec, variables, AXIS), gx, gy, w.mesh)[0])
    if not w.first:
        return []
    (_, (ref_logits, ref_stats)), ref_grads = _loss_and_grads(spec.build_linen())(
        variables["params"], variables["batch_stats"], x, y, key
    )
    ref_every_device = jax.tree_util.tree_map(lambda s: jnp.broadcast_to(s, (w.devices, *s.shape)), ref_stats)
    tag = f"{name}: sync BN == one device, global batch"
    return [
        _record(w, "linen", "sync", f"{tag} (logits)", logits, ref_logits, "logits"),
        _record(w, "linen", "sync", f"{tag} (gradients)", grads, ref_grads, "grads"),
        _record(w, "linen", "sync", f"{tag} (running stats, every device)", stats, ref_every_device, "stats"),
        _record(w, "nnx", "sync", f"{name}: sync BN logits == reference", n_logits, ref_logits, "logits"),
    ]


def per_device(w: Where, name: str) -> list[dict]:
    """Per-device BatchNorm equals each shard alone, with per-device statistics (linen; nnx
    per device is in the training runs of ``compare.parallel.jax_worker``)."""
    spec, variables, x, y = _setup(name, SHARD * w.devices)
    key = jax.random.key(0)
    model = spec.build_linen()
    gx, gy = _global(w, x, y)
    logits, grads, stats = parallel.to_host(parallel.linen_forward_backward(model, variables, gx, gy, w.mesh, key))
    if not w.first:
        return []
    shards = zip(np.split(x, w.devices), np.split(y, w.devices), strict=True)
    alone = [_loss_and_grads(model)(variables["params"], variables["batch_stats"], xs, ys, key) for xs, ys in shards]
    alone_logits = jnp.concatenate([a[0][1][0] for a in alone])
    alone_grads = jax.tree_util.tree_map(lambda *g: sum(g) / w.devices, *[a[1] for a in alone])
    alone_stats = jax.tree_util.tree_map(lambda *s: jnp.stack(s), *[a[0][1][1] for a in alone])
    tag = f"{name}: per-device BN == each shard alone"
    return [
        _record(w, "linen", "per_device", f"{tag} (logits)", logits, alone_logits, "logits"),
        _record(w, "linen", "per_device", f"{tag} (mean gradients)", grads, alone_grads, "grads"),
        _record(w, "linen", "per_device", f"{tag} (per-device stats)", stats, alone_stats, "stats"),
    ]


def training(w: Where, name: str, steps: int = 5) -> list[dict]:
    """``steps`` data-parallel steps with synchronised statistics follow the single-device run."""
    spec, variables, x, y = _setup(name, SHARD * w.devices)
    key = jax.random.key(0)
    tx = optax.sgd(0.1, momentum=0.9)
    rng = np.random.default_rng(1)
    batches = [((x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), y) for _ in range(steps)]
    model = spec.build_linen(bn_axis_name=AXIS)
    state, step = parallel.linen_state(w.mesh, variables, tx, "sync"), parallel.linen_step(w.mesh, model, tx, "sync")
    for bx, by in batches:
        state, _ = step(state, *_global(w, bx, by), key)
    dp = parallel.to_host(state)
    dp_model = _nnx_from(spec, variables, AXIS)
    graphdef, n_state = parallel.nnx_state(w.mesh, dp_model, nnx.Optimizer(dp_model, tx, wrt=nnx.Param), "sync")
    n_step = parallel.nnx_step(w.mesh, graphdef, "sync")
    for bx, by in batches:
        n_state, _ = n_step(n_state, *_global(w, bx, by))
    dp_model, _ = parallel.nnx_merge(graphdef, n_state, "sync")
    if not w.first:
        return []
    one = parallel.linen_train(spec.build_linen(), variables, tx, batches, 1, key)
    check = f"{name}: {steps} data-parallel steps == one device"
    out = [_record(w, "linen", "sync", check, (dp.params, dp.batch_stats), (one.params, one.batch_stats), "train")]
    one_model = _nnx_from(spec, variables, None)
    one_opt = nnx.Optimizer(one_model, tx, wrt=nnx.Param)
    one_step = nnx.jit(ftrain.nnx_train_step)
    for bx, by in batches:
        one_step(one_model, one_opt, bx, by)
    state = [nnx.to_pure_dict(nnx.state(m, (nnx.Param, nnx.BatchStat))) for m in (dp_model, one_model)]
    out.append(_record(w, "nnx", "sync", check, *state, "train"))
    return out


def dropout_masks(w: Where) -> list[dict]:
    """Every device draws its own masks, from its global index: device d's masks are those
    of one device given ``fold_in(key, d)``, whatever the split into processes. Without
    ``fold_in(axis_index)`` every device draws the same masks (the bug)."""
    spec, variables, x, y = _setup("mlp", SHARD * w.devices, dropout=0.5)
    same_x = np.tile(x[:SHARD], (w.devices, 1))  # the same samples on every device
    model, key = spec.build_linen(), jax.random.key(0)
    gx, gy = _global(w, same_x, y)
    logits = parallel.to_host(parallel.linen_forward_backward(model, variables, gx, gy, w.mesh, key)[0])
    again = parallel.to_host(parallel.linen_forward_backward(model, variables, gx, gy, w.mesh, key)[0])
    bug = parallel.linen_forward_backward(model, variables, gx, gy, w.mesh, key, fold_device_into_key=False)
    bug = parallel.to_host(bug[0])
    if not w.first:
        return []
    per = np.split(logits, w.devices)
    closest = min(
        (diffs.max_abs(per[i], per[j]), i, j) for i in range(w.devices) for j in range(i + 1, w.devices)
    )  # the pair of devices whose masks are the most alike
    one = _loss_and_grads(model)
    ys = np.split(y, w.devices)
    alone = [
        one(variables["params"], variables["batch_stats"], x[:SHARD], ys[d], jax.random.fold_in(key, d))[0][1][0]
        for d in range(w.devices)
    ]
    bug_check = "the bug: without fold_in(axis_index) every device draws the same masks"
    return [
        _control(w, f"dropout masks differ between every pair of devices (closest: {closest[1]}, {closest[2]})",
                 per[closest[1]], per[closest[2]], differ=True),
        _control(w, "dropout masks are reproducible: the same key twice gives the same masks", logits, again,
                 differ=False),
        _record(w, "linen", "per_device", "device d's masks == one device with fold_in(key, d) (global device index)",
                logits, np.concatenate(alone), "logits"),
        _control(w, bug_check, *np.split(bug, w.devices)[:2], differ=False),
    ]  # fmt: skip


def modes_differ(w: Where) -> list[dict]:
    """The control: per-device and synchronised statistics really give other outputs."""
    spec, variables, x, y = _setup("mlp", SHARD * w.devices)
    key = jax.random.key(0)
    gx, gy = _global(w, x, y)
    sync = parallel.linen_forward_backward(spec.build_linen(bn_axis_name=AXIS), variables, gx, gy, w.mesh, key)[0]
    ghost = parallel.linen_forward_backward(spec.build_linen(), variables, gx, gy, w.mesh, key)[0]
    sync, ghost = parallel.to_host((sync, ghost))
    return [_control(w, "per-device BN differs from synchronised BN", sync, ghost, differ=True)] if w.first else []


def sharded_jit(w: Where) -> list[dict]:
    """Ghost BatchNorm is a shard_map/pmap effect: under plain ``jax.jit`` with the batch
    sharded over the devices, a BatchNorm without ``axis_name`` still sees the whole
    batch (GSPMD inserts the reductions), so its statistics are global."""
    spec, variables, x, y = _setup("mlp", SHARD * w.devices)
    model = spec.build_linen()  # no axis name
    key = jax.random.key(0)
    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}))
    logits, updates = parallel.to_host(step(parallel.put(w.mesh, variables), *_global(w, x)))
    if not w.first:
        return []
    (_, (ref_logits, ref_stats)), _ = _loss_and_grads(model)(variables["params"], variables["batch_stats"], x, y, key)
    check = "plain jit on a batch-sharded input, no axis_name: global statistics (not ghost BN)"
    return [
        _record(w, "linen", "sync", f"{check} (logits)", logits, ref_logits, "logits"),
        _record(w, "linen", "sync", f"{check} (running stats)", updates["batch_stats"], ref_stats, "stats"),
    ]


def uneven(w: Where) -> tuple[list[dict], dict]:
    """Flax's ``BatchNorm(axis_name=...)`` on uneven shards, padded and masked: the mean
    of the devices' (masked) means, equal weight per device, not the valid rows' mean.
    Returns the records and the statistics used (for the comparison with torch)."""
    x, valid = uneven_shards(w.devices, SHARD)
    bn = LinenBatchNorm(use_running_average=False, momentum=0.0, axis_name=AXIS, use_fast_variance=False)
    variables = bn.init(jax.random.key(0), x[:2])

    def local(v, x, m):
        _, updates = bn.apply(v, x, mask=m, mutable=["batch_stats"])
        return jax.tree_util.tree_map(lambda a: a[None], updates["batch_stats"])  # momentum 0: the batch's

    run = jax.jit(jax.shard_map(local, mesh=w.mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(AXIS)))
    stats = parallel.to_host(run(parallel.put(w.mesh, variables), *_global(w, x, valid)))
    if not w.first:
        return [], {}
    mean, var = stats["mean"][0], stats["var"][0]
    shards = [x[d * SHARD : (d + 1) * SHARD][valid[d * SHARD : (d + 1) * SHARD, 0]] for d in range(w.devices)]
    equal_mean = np.mean([s.mean(0) for s in shards], 0)
    equal_var = np.mean([((s - equal_mean) ** 2).mean(0) for s in shards], 0)
    every = x[valid[:, 0]]
    counted_mean = every.mean(0)
    tag = f"uneven shards {[len(s) for s in shards]} (padded, masked)"
    records = [
        _record(w, "linen", "sync", f"{tag}: Flax mean == equal-weight mean of device means", mean, equal_mean, "stats"),
        _record(w, "linen", "sync", f"{tag}: Flax variance == equal-weight formula", var, equal_var, "stats"),
        _control(w, f"{tag}: Flax mean != count-weighted global mean", mean, counted_mean, differ=True,
                 bn_mode="sync"),
    ]  # fmt: skip
    used = {"mean": mean.tolist(), "var": var.tolist(), "counts": [len(s) for s in shards]}
    return records, used


def checks(w: Where | int, models=("mlp", "cnn")) -> list[dict]:
    """Every JAX check of the distributed spec on the mesh ``w`` (a device count: one
    process with that many simulated devices). Tolerances: the ``parallel.*`` entries of
    ``compare.checks.tolerances``."""
    w = where(w) if isinstance(w, int) else w
    records = []
    for name in models:
        records += synchronised(w, name) + per_device(w, name) + training(w, name)
    return records + dropout_masks(w) + modes_differ(w) + sharded_jit(w) + uneven(w)[0]


def run_in_subprocess(device_counts=(2, 4, 8), timeout: int = 900) -> list[dict]:
    """:func:`checks` for each device count, in a fresh process with that many simulated
    CPU devices (XLA_FLAGS must be set before jax starts, so not in this process)."""
    import json
    import os
    import subprocess
    import sys

    from compare.parallel.launch import ROOT

    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(device_counts)}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    code = (  # checks only: compiled with most optimisations off, as the multi-process check jobs are
        "import json, sys, jax; jax.config.update('jax_disable_most_optimizations', True); "
        "from compare.parallel.jax_checks import checks; "
        f"print(json.dumps([r for d in {tuple(device_counts)!r} for r in checks(d)]))"
    )
    cmd = [sys.executable, "-c", code]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the data-parallel checks on {device_counts} devices failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
