"""The JAX data-parallel checks of the ``distributed`` suite (the library is
``flaxbn.parallel``): synchronised BatchNorm against one device with the global batch,
per-device BatchNorm against each shard alone, data-parallel training against the
single-device run, and per-device dropout masks, in linen and nnx.

The device count of a process is fixed when jax starts, so :func:`run_in_subprocess`
runs :func:`checks` in a fresh process with simulated CPU devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import flaxbn.train as ftrain
from compare import registry, transfer
from compare.checks import diffs, tolerances
from compare.records import DistributedRecord
from flaxbn import parallel
from flaxbn.parallel import AXIS

TOL = {name: tolerances.get(f"parallel.{name}") for name in ("logits", "grads", "stats", "train")}


def _setup(name: str, batch: int, dropout: float = 0.0):
    base = {
        "mlp": registry.get("mlp").replace(in_features=12, hidden=(16, 8)),
        "cnn": registry.get("cnn").replace(in_channels=2, image_size=8, channels=(4, 8), hidden=16, dropout2d=dropout),
    }[name].replace(dropout=dropout)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *base.flax_input_shape), dtype=np.float32) * 2 + 0.5)
    y = jnp.asarray(rng.integers(0, base.config.num_classes, batch))
    variables = base.build_linen().init(jax.random.key(1), x[:2], train=False)
    return base, variables, x, y


def _record(framework: str, devices: int, bn_mode: str, check: str, got, want, tol: str) -> dict:
    d = diffs.tree_diff(got, want)
    t = TOL[tol]
    return DistributedRecord(
        framework=framework,
        devices=devices,
        bn_mode=bn_mode,
        check=check,
        max_abs_diff=d.max_abs,
        tol=t.bound(d.scale),
        ok=t.holds(d.max_abs, d.scale),
    ).to_dict()


def _control(devices: int, check: str, a, b, *, differ: bool) -> dict:
    """A control record: holds when ``a`` and ``b`` differ by more than 1e-3 (``differ``)
    or are exactly equal (not ``differ``)."""
    d = diffs.max_abs(a, b)
    return DistributedRecord(
        framework="linen",
        devices=devices,
        bn_mode="per_device",
        check=check,
        max_abs_diff=d,
        tol=1e-3 if differ else 0.0,
        ok=d > 1e-3 if differ else d == 0.0,
    ).to_dict()


def _nnx_from(spec: registry.ModelSpec, variables: dict, bn_axis_name: str | None) -> nnx.Module:
    model = spec.build_nnx(nnx.Rngs(params=0, dropout=1), bn_axis_name=bn_axis_name)
    transfer.linen_to_nnx(variables, spec, model)
    model.train()
    return model


def synchronised(name: str, devices: int) -> list[dict]:
    """Synchronised BatchNorm equals one device with the global batch (linen and nnx)."""
    spec, variables, x, y = _setup(name, 8 * devices)
    key = jax.random.key(0)
    (_, (ref_logits, ref_stats)), ref_grads = ftrain.linen_loss_and_grads(
        spec.build_linen().apply, variables["params"], variables["batch_stats"], x, y, key
    )
    logits, grads, stats = parallel.linen_forward_backward(
        spec.build_linen(bn_axis_name=AXIS), variables, x, y, devices, key
    )
    ref_every_device = jax.tree_util.tree_map(lambda s: jnp.broadcast_to(s, (devices, *s.shape)), ref_stats)
    tag = f"{name}: sync BN == one device, global batch"
    out = [
        _record("linen", devices, "sync", f"{tag} (logits)", logits, ref_logits, "logits"),
        _record("linen", devices, "sync", f"{tag} (gradients)", grads, ref_grads, "grads"),
        _record("linen", devices, "sync", f"{tag} (running stats, every device)", stats, ref_every_device, "stats"),
    ]
    n_logits, _, _ = parallel.nnx_forward_backward(_nnx_from(spec, variables, AXIS), x, y, devices)
    out.append(_record("nnx", devices, "sync", f"{name}: sync BN logits == reference", n_logits, ref_logits, "logits"))
    return out


def per_device(name: str, devices: int) -> list[dict]:
    """Per-device BatchNorm equals each shard alone, with per-device statistics."""
    spec, variables, x, y = _setup(name, 8 * devices)
    key = jax.random.key(0)
    model = spec.build_linen()
    shards = zip(jnp.split(x, devices), jnp.split(y, devices), strict=True)
    alone = [
        ftrain.linen_loss_and_grads(model.apply, variables["params"], variables["batch_stats"], xs, ys, key)
        for xs, ys in shards
    ]
    alone_logits = jnp.concatenate([a[0][1][0] for a in alone])
    alone_grads = jax.tree_util.tree_map(lambda *g: sum(g) / devices, *[a[1] for a in alone])
    alone_stats = jax.tree_util.tree_map(lambda *s: jnp.stack(s), *[a[0][1][1] for a in alone])
    logits, grads, stats = parallel.linen_forward_backward(model, variables, x, y, devices, key)
    tag = f"{name}: per-device BN == each shard alone"
    n_logits, _, _ = parallel.nnx_forward_backward(_nnx_from(spec, variables, None), x, y, devices)
    return [
        _record("linen", devices, "per_device", f"{tag} (logits)", logits, alone_logits, "logits"),
        _record("linen", devices, "per_device", f"{tag} (mean gradients)", grads, alone_grads, "grads"),
        _record("linen", devices, "per_device", f"{tag} (per-device stats)", stats, alone_stats, "stats"),
        _record("nnx", devices, "per_device", f"{name}: per_device BN logits == reference", n_logits, alone_logits, "logits"),
    ]  # fmt: skip


def training(name: str, devices: int) -> list[dict]:
    """Five data-parallel steps with synchronised statistics follow the single-device run."""
    spec, variables, x, y = _setup(name, 8 * devices)
    key = jax.random.key(0)
    tx = optax.sgd(0.1, momentum=0.9)
    rng = np.random.default_rng(1)
    batches = [(x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), y) for _ in range(5)]
    dp = parallel.linen_train(spec.build_linen(bn_axis_name=AXIS), variables, tx, batches, devices, key)
    one = parallel.linen_train(spec.build_linen(), variables, tx, batches, 1, key)
    check = f"{name}: 5 data-parallel steps == one device"
    out = [
        _record("linen", devices, "sync", check, (dp.params, dp.batch_stats), (one.params, one.batch_stats), "train")
    ]
    dp_model, one_model = _nnx_from(spec, variables, AXIS), _nnx_from(spec, variables, None)
    dp_opt, one_opt = nnx.Optimizer(dp_model, tx, wrt=nnx.Param), nnx.Optimizer(one_model, tx, wrt=nnx.Param)
    parallel.nnx_train(dp_model, dp_opt, batches, devices)
    one_step = nnx.jit(ftrain.nnx_train_step)
    for bx, by in batches:
        one_step(one_model, one_opt, bx, by)
    state = [nnx.to_pure_dict(nnx.state(m, (nnx.Param, nnx.BatchStat))) for m in (dp_model, one_model)]
    out.append(_record("nnx", devices, "sync", check, *state, "train"))
    return out


def dropout_masks(devices: int) -> list[dict]:
    """Every device draws its own masks; without ``fold_in(axis_index)`` they are equal (the bug)."""
    spec, variables, x, y = _setup("mlp", 8 * devices, dropout=0.5)
    same_x = jnp.tile(x[:8], (devices, 1))  # the same samples on every device
    model, key = spec.build_linen(), jax.random.key(0)
    logits, _, _ = parallel.linen_forward_backward(model, variables, same_x, y, devices, key)
    bug, _, _ = parallel.linen_forward_backward(model, variables, same_x, y, devices, key, fold_device_into_key=False)
    bug_check = "the bug: without fold_in(axis_index) every device draws the same masks"
    return [
        _control(devices, "dropout masks differ between devices (same input)", logits[:8], logits[8:16], differ=True),
        _control(devices, bug_check, bug[:8], bug[8:16], differ=False),
    ]


def modes_differ(devices: int) -> list[dict]:
    """The control: per-device and synchronised statistics really give other outputs."""
    spec, variables, x, y = _setup("mlp", 8 * devices)
    key = jax.random.key(0)
    sync = parallel.linen_forward_backward(spec.build_linen(bn_axis_name=AXIS), variables, x, y, devices, key)[0]
    ghost = parallel.linen_forward_backward(spec.build_linen(), variables, x, y, devices, key)[0]
    return [_control(devices, "per-device BN differs from synchronised BN", sync, ghost, differ=True)]


def sharded_jit(devices: int) -> list[dict]:
    """Ghost BatchNorm is a shard_map/pmap effect: under plain ``jax.jit`` with the batch
    sharded over the devices, a BatchNorm without ``axis_name`` still sees the whole
    batch (GSPMD inserts the reductions), so its statistics are global."""
    spec, variables, x, y = _setup("mlp", 8 * devices)
    model = spec.build_linen()  # no axis name
    key = jax.random.key(0)
    (_, (ref_logits, ref_stats)), _ = ftrain.linen_loss_and_grads(
        model.apply, variables["params"], variables["batch_stats"], x, y, key
    )
    sharding = jax.sharding.NamedSharding(parallel.mesh(devices), jax.sharding.PartitionSpec(AXIS))
    x_sharded = jax.device_put(x, sharding)
    step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}))
    logits, updates = step(variables, x_sharded)
    check = "plain jit on a batch-sharded input, no axis_name: global statistics (not ghost BN)"
    return [
        _record("linen", devices, "sync", f"{check} (logits)", logits, ref_logits, "logits"),
        _record("linen", devices, "sync", f"{check} (running stats)", updates["batch_stats"], ref_stats, "stats"),
    ]


def checks(devices: int, models=("mlp", "cnn")) -> list[dict]:
    """Every JAX check of the distributed spec on ``devices`` devices (tolerances: the
    ``parallel.*`` entries of ``compare.checks.tolerances``)."""
    records = []
    for name in models:
        records += synchronised(name, devices) + per_device(name, devices) + training(name, devices)
    return records + dropout_masks(devices) + modes_differ(devices) + sharded_jit(devices)


def run_in_subprocess(device_counts=(2, 4, 8), timeout: int = 600) -> list[dict]:
    """:func:`checks` for each device count, in a fresh process with that many simulated
    CPU devices (XLA_FLAGS must be set before jax starts, so not in this process)."""
    import json
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={max(device_counts)}",
        "JAX_PLATFORMS": "cpu",
    }
    code = (
        "import json, sys; from compare.checks.parallel_jax import checks; "
        f"print(json.dumps([r for d in {tuple(device_counts)!r} for r in checks(d)]))"
    )
    cmd = [sys.executable, "-c", code]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the data-parallel checks on {device_counts} devices failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
