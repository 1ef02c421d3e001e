"""Data parallelism in JAX: the batch split over a mesh axis ``"data"`` with ``jax.shard_map``,
BatchNorm either synchronised over that axis (``bn_axis_name="data"``: statistics of the
global batch) or per device (``None``: each device normalises with its own shard, "ghost"
BatchNorm, and keeps its own running statistics).

Each device draws its own dropout masks: the key is folded with ``axis_index("data")``.
Without that fold every device would apply the same mask to its shard, a silent bug
(``tests/test_distributed.py`` shows both).

Runs on any device set, CPU included (``XLA_FLAGS=--xla_force_host_platform_device_count=8``
set before jax starts simulates 8 devices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import flaxbn.train as ftrain
from compare.registry import ModelSpec

AXIS = "data"


def mesh(devices: int) -> jax.sharding.Mesh:
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
    spec: ModelSpec, variables: dict, x, y, devices: int, bn_mode: str, key=None, fold_device_into_key: bool = True
):
    """One train-mode forward and backward of the global batch ``x`` (Flax layout) split
    over ``devices``. Returns (logits of the global batch, mean gradients, batch_stats per
    device with a leading devices axis). ``fold_device_into_key=False`` reproduces the
    bug of one dropout mask on every device."""
    model = spec.build_linen(bn_axis_name=AXIS if bn_mode == "sync" else None)
    key = jax.random.key(0) if key is None else key

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


def nnx_forward_backward(spec: ModelSpec, model_state, x, y, devices: int, bn_mode: str):
    """The same with an nnx model, split once and merged inside ``shard_map``.
    ``model_state`` is ``(graphdef, state)`` of a model built with the chosen bn mode."""
    graphdef, state = model_state

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


def dp_train(spec: ModelSpec, variables: dict, tx, batches, devices: int, bn_mode: str = "sync", key=None):
    """Data-parallel training with synchronised BatchNorm: every step takes a global
    batch, splits it, averages the gradients. Returns the final linen state."""
    if bn_mode != "sync":
        raise ValueError("dp_train keeps one set of running statistics: it needs bn_mode='sync'")
    model = spec.build_linen(bn_axis_name=AXIS)
    key = jax.random.key(0) if key is None else key
    state = ftrain.linen_init_state(variables, tx)

    def local(state, x, y, key):
        step_key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(AXIS))
        (loss, (_, stats)), grads = ftrain.linen_loss_and_grads(
            model.apply, state.params, state.batch_stats, x, y, step_key
        )
        grads, loss = jax.lax.pmean((grads, loss), AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, state.params, updates)
        return ftrain.LinenState(params, stats, opt_state, state.step + 1), loss

    step = jax.jit(
        jax.shard_map(
            local, mesh=mesh(devices), in_specs=(P(), P(AXIS), P(AXIS), P()), out_specs=(P(), P()), check_vma=False
        )
    )
    for x, y in batches:
        state, _ = step(state, x, y, key)
    return state


def nnx_dp_train(model: nnx.Module, optimizer: nnx.Optimizer, batches, devices: int) -> None:
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


def single_device_train(spec: ModelSpec, variables: dict, tx, batches, key=None):
    """The reference: the same steps on one device with the global batch."""
    model = spec.build_linen()
    key = jax.random.key(0) if key is None else key
    state = ftrain.linen_init_state(variables, tx)
    step = jax.jit(functools.partial(ftrain.linen_train_step, model.apply, tx))
    for x, y in batches:
        state, _ = step(state, x, y, key)
    return state


def tree_max_abs_diff(a, b) -> float:
    leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda u, v: jnp.max(jnp.abs(u - v)), a, b))
    return float(np.max([float(v) for v in leaves])) if leaves else 0.0


# --- the checks (records for the ``distributed`` suite and the tests) -----------------------

TOL = {"logits": 1e-5, "grads": 1e-5, "stats": 1e-6, "train": 1e-5}  # float32; see checks()


def _setup(name: str, batch: int, dropout: float = 0.0):
    from compare import registry

    base = {
        "mlp": registry.get("mlp").replace(in_features=12, hidden=(16, 8)),
        "cnn": registry.get("cnn").replace(in_channels=2, image_size=8, channels=(4, 8), hidden=16, dropout2d=dropout),
    }[name].replace(dropout=dropout)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *base.flax_input_shape), dtype=np.float32) * 2 + 0.5)
    y = jnp.asarray(rng.integers(0, base.config.num_classes, batch))
    variables = base.build_linen().init(jax.random.key(1), x[:2], train=False)
    return base, variables, x, y


def _record(framework, devices, bn_mode, check, diff, tol):
    return {
        "framework": framework,
        "devices": devices,
        "bn_mode": bn_mode,
        "check": check,
        "max_abs_diff": diff,
        "tol": tol,
        "ok": bool(diff <= tol),
    }


def checks(devices: int, models=("mlp", "cnn")) -> list[dict]:
    """Every JAX equivalence of the distributed spec on ``devices`` devices.

    Float32 tolerances: reductions run in another order across shards; measured worst
    case on CPU with 2-8 devices: logits 1e-6, gradients 1e-6, running statistics 2e-7,
    5 training steps 3e-7.
    """
    import optax

    records = []
    batch = 8 * devices
    for name in models:
        spec, variables, x, y = _setup(name, batch)
        model = spec.build_linen()
        ref = ftrain.linen_loss_and_grads(
            model.apply, variables["params"], variables["batch_stats"], x, y, jax.random.key(0)
        )
        (_, (ref_logits, ref_stats)), ref_grads = ref
        # synchronised: equals one device with the global batch
        logits, grads, stats = linen_forward_backward(spec, variables, x, y, devices, "sync")
        tag = f"{name}: sync BN == one device, global batch"
        records += [
            _record("linen", devices, "sync", f"{tag} (logits)", tree_max_abs_diff(logits, ref_logits), TOL["logits"]),
            _record("linen", devices, "sync", f"{tag} (gradients)", tree_max_abs_diff(grads, ref_grads), TOL["grads"]),
            _record(
                "linen", devices, "sync", f"{tag} (running stats, every device)",
                max(tree_max_abs_diff(jax.tree_util.tree_map(lambda s, d=d: s[d], stats), ref_stats) for d in range(devices)),
                TOL["stats"],
            ),
        ]  # fmt: skip
        # per device: equals each shard alone (ghost BatchNorm), with per-device statistics
        logits, grads, stats = linen_forward_backward(spec, variables, x, y, devices, "per_device")
        shard = batch // devices
        alone = [
            ftrain.linen_loss_and_grads(
                model.apply, variables["params"], variables["batch_stats"], x[d * shard : (d + 1) * shard],
                y[d * shard : (d + 1) * shard], jax.random.key(0),
            )
            for d in range(devices)
        ]  # fmt: skip
        alone_logits = jnp.concatenate([a[0][1][0] for a in alone])
        alone_grads = jax.tree_util.tree_map(lambda *g: sum(g) / devices, *[a[1] for a in alone])
        alone_stats = jax.tree_util.tree_map(lambda *s: jnp.stack(s), *[a[0][1][1] for a in alone])
        tag = f"{name}: per-device BN == each shard alone"
        records += [
            _record(
                "linen",
                devices,
                "per_device",
                f"{tag} (logits)",
                tree_max_abs_diff(logits, alone_logits),
                TOL["logits"],
            ),
            _record(
                "linen",
                devices,
                "per_device",
                f"{tag} (mean gradients)",
                tree_max_abs_diff(grads, alone_grads),
                TOL["grads"],
            ),
            _record(
                "linen",
                devices,
                "per_device",
                f"{tag} (per-device stats)",
                tree_max_abs_diff(stats, alone_stats),
                TOL["stats"],
            ),
        ]
        # nnx, both modes
        for bn_mode in ("sync", "per_device"):
            nnx_model = spec.build_nnx(nnx.Rngs(0), bn_axis_name=AXIS if bn_mode == "sync" else None)
            nnx.update(nnx_model, nnx.state(_linen_into_nnx(spec, variables)))
            n_logits, _, _ = nnx_forward_backward(spec, nnx.split(nnx_model), x, y, devices, bn_mode)
            want = ref_logits if bn_mode == "sync" else alone_logits
            records.append(
                _record(
                    "nnx",
                    devices,
                    bn_mode,
                    f"{name}: {bn_mode} BN logits == reference",
                    tree_max_abs_diff(n_logits, want),
                    TOL["logits"],
                )
            )
        # a data-parallel training run follows the single-device one
        tx = optax.sgd(0.1, momentum=0.9)
        rng = np.random.default_rng(1)
        batches = [(x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), y) for _ in range(5)]
        dp = dp_train(spec, variables, tx, batches, devices)
        single = single_device_train(spec, variables, tx, batches)
        diff = max(tree_max_abs_diff(dp.params, single.params), tree_max_abs_diff(dp.batch_stats, single.batch_stats))
        records.append(
            _record("linen", devices, "sync", f"{name}: 5 data-parallel steps == one device", diff, TOL["train"])
        )
        dp_model = _linen_into_nnx_with(spec, variables, bn_axis_name=AXIS)
        one_model = _linen_into_nnx_with(spec, variables, bn_axis_name=None)
        dp_opt, one_opt = nnx.Optimizer(dp_model, tx, wrt=nnx.Param), nnx.Optimizer(one_model, tx, wrt=nnx.Param)
        nnx_dp_train(dp_model, dp_opt, batches, devices)
        one_step = nnx.jit(ftrain.nnx_train_step)
        for bx, by in batches:
            one_step(one_model, one_opt, bx, by)
        diff = tree_max_abs_diff(
            nnx.to_pure_dict(nnx.state(dp_model, (nnx.Param, nnx.BatchStat))),
            nnx.to_pure_dict(nnx.state(one_model, (nnx.Param, nnx.BatchStat))),
        )
        records.append(
            _record("nnx", devices, "sync", f"{name}: 5 data-parallel steps == one device", diff, TOL["train"])
        )
    # every device draws its own dropout masks
    spec, variables, x, y = _setup("mlp", 8 * devices, dropout=0.5)
    same_x = jnp.tile(x[:8], (devices, 1))  # the same samples on every device
    logits, _, _ = linen_forward_backward(spec, variables, same_x, y, devices, "per_device")
    spread = float(jnp.max(jnp.abs(logits[:8] - logits[8:16])))
    records.append(
        {
            **_record("linen", devices, "per_device", "dropout masks differ between devices (same input)", 0.0, 0.0),
            "max_abs_diff": spread,
            "ok": spread > 1e-3,
        }
    )
    logits, _, _ = linen_forward_backward(spec, variables, same_x, y, devices, "per_device", fold_device_into_key=False)
    spread = float(jnp.max(jnp.abs(logits[:8] - logits[8:16])))
    records.append(
        _record(
            "linen",
            devices,
            "per_device",
            "the bug: without fold_in(axis_index) every device draws the same masks",
            spread,
            0.0,
        )
    )
    # the two modes really differ (otherwise the checks above would prove nothing)
    spec, variables, x, y = _setup("mlp", 8 * devices)
    sync_logits = linen_forward_backward(spec, variables, x, y, devices, "sync")[0]
    ghost_logits = linen_forward_backward(spec, variables, x, y, devices, "per_device")[0]
    records.append(
        {
            **_record("linen", devices, "per_device", "per-device BN differs from synchronised BN", 0.0, 0.0),
            "max_abs_diff": tree_max_abs_diff(sync_logits, ghost_logits),
            "ok": tree_max_abs_diff(sync_logits, ghost_logits) > 1e-3,
        }
    )
    return records


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
    cmd = [sys.executable, "-m", "compare.checks.parallel_jax", *map(str, device_counts)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _linen_into_nnx(spec: ModelSpec, variables: dict) -> nnx.Module:
    from compare import transfer

    return transfer.linen_to_nnx(variables, spec)


def _linen_into_nnx_with(spec: ModelSpec, variables: dict, **fields) -> nnx.Module:
    from compare import transfer

    model = spec.build_nnx(nnx.Rngs(params=0, dropout=1), **fields)
    transfer.linen_to_nnx(variables, spec, model)
    model.train()
    return model


if __name__ == "__main__":
    import json
    import sys

    out = []
    for count in map(int, sys.argv[1:] or ["2", "4", "8"]):
        out += checks(count)
    print(json.dumps(out))
