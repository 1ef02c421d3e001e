"""What data parallelism costs.

* Counted, not estimated: the collectives of one training step and the bytes each device
  contributes to them, per model and BatchNorm mode. JAX: the all-reduces of the lowered
  StableHLO (what the program asks for: one per ``pmean``, split into the forward's, found
  by lowering the forward alone, and the rest) and of the compiled CPU program (what runs:
  XLA's combiner merges independent ones). torch: every collective the profiler records in
  a steady-state DDP step (``gloo:all_reduce``, ``gloo:all_gather``, ``gloo:broadcast``).
* On paper, for a GPU cluster: each collective costs a latency plus its bytes over the
  link's bus bandwidth (NCCL's ring model), against each model's step time on the H100
  baseline. The synchronised forward's all-reduces sit on the critical path (each BatchNorm
  waits for its statistics); the gradients' can overlap the backward pass.
* Measured on this machine: step times with 1 and 2 processes of one device (one core)
  each; see :func:`time_jax` and ``docs/distributed.md`` for what they do and do not show.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import time
from pathlib import Path

from compare.records import CollectiveRecord, CommModelRecord, StepTimeRecord

BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "s64": 8, "i32": 4, "s32": 4, "ui32": 4, "u32": 4, "i1": 1}
BATCH_PER_DEVICE = {"mlp": 64, "cnn": 32, "resnet18_cifar": 32}
BASELINE = Path(__file__).resolve().parents[2] / "results" / "nvidia-h100-80gb-hbm3" / "baseline-2026-11-27.json"


@dataclasses.dataclass(frozen=True)
class Link:
    """A GPU interconnect for the paper model. ``busbw``: the all-reduce bus bandwidth
    NCCL reaches on large messages (bytes/s); ``latency``: one small collective's time (s)."""

    name: str
    what: str
    busbw: float
    latency: float
    source: str


GPUS = 8
LINKS = (
    Link("nvlink", "8 H100 SXM in one node, NVLink 4 through NVSwitch", 450e9, 8e-6,
         "busbw 460-480 GB/s measured by nccl-tests on 8x H100 SXM (docs.alayanew.com, 2026); "
         "latency 6 us for 2 GPUs (NVIDIA/nccl#1259), 3.5 us on 4 H800 without CUDA graphs (NVIDIA/nccl#1984)"),
    Link("infiniband", "H100 nodes, one 400 Gb/s InfiniBand NDR link per GPU", 45e9, 25e-6,
         "line rate 50 GB/s per GPU; 25 us is NCCL's own model for a 128-byte all-reduce across H100 nodes "
         "(NVIDIA/nccl#1453)"),
    Link("ethernet", "nodes with 100 Gb/s Ethernet per GPU", 11e9, 50e-6, "assumed: line rate 12.5 GB/s, TCP latency"),
)  # fmt: skip


# --- counting: JAX -------------------------------------------------------------------------------


def _tensor_bytes(t: str) -> int:
    """Bytes of an MLIR tensor type, ``tensor<12x16xf32>`` or ``tensor<f32>``."""
    m = re.fullmatch(r"tensor<((?:\d+x)*)(\w+)>", t.strip())
    dims = [int(d) for d in m.group(1).split("x") if d]
    n = 1
    for d in dims:
        n *= d
    return n * BYTES[m.group(2)]


def lowered_all_reduces(lowered) -> list[int]:
    """The bytes of every ``stablehlo.all_reduce`` of a lowered jax function, in program order."""
    found: list[int] = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.all_reduce":
                        found.append(sum(_tensor_bytes(str(r.type)) for r in inner.operation.results))
                    walk(inner.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    return found


def compiled_all_reduces(hlo: str) -> list[int]:
    """The bytes of every all-reduce of a compiled HLO module's text (combined ones count once)."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(\(.*?\)|\S+)\s+all-reduce(?:-start)?\(", line)
        if m:
            out.append(sum(_shape_bytes(t, s) for t, s in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))))
    return out


def _shape_bytes(dtype: str, shape: str) -> int:
    n = 1
    for d in filter(None, shape.split(",")):
        n *= int(d)
    return n * {"pred": 1, "s8": 1, "u8": 1}.get(dtype, BYTES.get(dtype, 4))


def _abstract_step(w, name: str, bn_mode: str, batch: int):
    """The data-parallel step of registry model ``name`` and abstract inputs (shapes and
    shardings only: nothing is initialised)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import flaxbn.train as ftrain
    from compare import registry
    from flaxbn import parallel

    spec = registry.get(name)
    tx = ftrain.sgd(0.1, momentum=0.9)
    x = jax.ShapeDtypeStruct((batch * w.devices, *spec.flax_input_shape), np.float32)
    variables = jax.eval_shape(lambda x: spec.build_linen().init(jax.random.key(0), x, train=False), x)
    state = jax.eval_shape(lambda v: ftrain.linen_init_state(v, tx), variables)
    if bn_mode == "per_device":
        stacked = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct((w.devices, *a.shape), a.dtype), state.batch_stats
        )
        state = state.replace(batch_stats=stacked)

    def placed(tree, spec):
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(w.mesh, spec)), tree
        )

    specs = parallel.linen_specs(bn_mode)
    state = jax.tree_util.tree_map(lambda s, t: placed(t, s), specs, state, is_leaf=lambda s: isinstance(s, P))
    x = placed(x, P(parallel.AXIS))
    y = placed(jax.ShapeDtypeStruct((x.shape[0],), np.int32), P(parallel.AXIS))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(w.mesh, P()))
    axis = parallel.AXIS if bn_mode == "sync" else None
    model = spec.build_linen(bn_axis_name=axis)
    step = parallel.linen_step(w.mesh, model, tx, bn_mode)

    def forward(params, stats, x, key):  # the train-mode forward alone: its collectives are BatchNorm's
        def local(params, stats, x, key):
            return model.apply({"params": params, "batch_stats": stats}, x, train=True, rngs={"dropout": key},
                               mutable=["batch_stats"])[0]  # fmt: skip

        run = jax.shard_map(local, mesh=w.mesh, in_specs=(P(), P(), P(parallel.AXIS), P()),
                            out_specs=P(parallel.AXIS), check_vma=False)  # fmt: skip
        return run(params, stats, x, key)

    stats = jax.tree_util.tree_map(lambda a: placed(jax.ShapeDtypeStruct(a.shape[1:], a.dtype), P()), state.batch_stats) \
        if bn_mode == "per_device" else state.batch_stats  # fmt: skip
    return step, (state, x, y, key), jax.jit(forward), (state.params, stats, x, key)


def count_jax(w, models=("mlp", "cnn"), compiled=("mlp", "cnn")) -> list[dict]:
    """The collectives of one data-parallel linen step on the mesh ``w``, both modes. The
    critical ones are synchronised BatchNorm's (the sync step's beyond the per-device
    step's, whose all-reduces are the gradients' and the loss's)."""
    import jax

    records = []
    for name in models:
        grads = None
        for mode in ("per_device", "sync"):
            step, args, forward, fargs = _abstract_step(w, name, mode, BATCH_PER_DEVICE.get(name, 32))
            lowered = step.lower(*args)
            every, fwd = lowered_all_reduces(lowered), lowered_all_reduces(forward.lower(*fargs))
            grads = grads or every  # the per-device step: gradients and loss only
            n_bn, bytes_bn = len(every) - len(grads), sum(every) - sum(grads)
            detail = (f"{len(grads)} for the gradients and the loss; BatchNorm: {len(fwd)} in the forward, "
                      f"{n_bn - len(fwd)} in the backward")  # fmt: skip
            base = dict(framework="jax", model=name, bn_mode=mode, devices=w.devices)
            records.append(CollectiveRecord(**base, source="stablehlo (lowered)", collectives=len(every),
                                            bytes_per_step=sum(every), critical_collectives=n_bn,
                                            critical_bytes=bytes_bn, detail=detail).to_dict())  # fmt: skip
            if name in compiled:
                combined = compiled_all_reduces(lowered.compile().as_text())
                records.append(CollectiveRecord(**base, source=f"hlo (compiled, {jax.devices()[0].platform})",
                                                collectives=len(combined), bytes_per_step=sum(combined),
                                                critical_collectives=None, critical_bytes=None,
                                                detail="after XLA's all-reduce combiner").to_dict())  # fmt: skip
    return records


# --- counting: torch (inside a torchrun rank) -----------------------------------------------------


def count_torch(models=("mlp", "cnn"), steps: int = 2) -> list[dict]:
    """Every collective the torch profiler records in one steady-state DDP step (after
    ``steps`` warm-up steps), per model and mode; rank 0 returns the records. Critical:
    the BatchNorm collectives (SyncBatchNorm's all_gather and backward all_reduce) and
    DDP's buffer broadcast, all in the way of the compute; the gradient buckets'
    all-reduces (the per-device step's) overlap the backward pass. Bytes: what one rank
    contributes, counted as float32."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from compare.parallel import torch_worker

    records = []
    for name in models:
        buckets: list[int] | None = None
        for mode in ("per_device", "sync"):
            ddp, opt, (x, y) = torch_worker.ddp_setup(name, mode, 4)  # the collectives do not depend on the batch
            for _ in range(steps):
                torch_worker.step(ddp, opt, x, y)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                torch_worker.step(ddp, opt, x, y)
            calls = [(e.name, 4 * _numel(e.input_shapes)) for e in prof.events() if re.match(r"(gloo|nccl):", e.name)]
            reduces = [b for n, b in calls if n.endswith("all_reduce")]
            buckets = reduces if buckets is None else buckets  # per-device: the gradients' buckets only
            kinds: dict[str, int] = {}
            for n, _ in calls:
                kinds[n] = kinds.get(n, 0) + 1
            records.append(CollectiveRecord(
                framework="torch", model=name, bn_mode=mode, devices=dist.get_world_size(), source="torch.profiler",
                collectives=len(calls), bytes_per_step=sum(b for _, b in calls),
                critical_collectives=len(calls) - len(buckets), critical_bytes=sum(b for _, b in calls) - sum(buckets),
                detail=", ".join(f"{k} x{v}" for k, v in sorted(kinds.items()))
                + ("; DDP broadcast_buffers=True" if mode == "per_device" else "; DDP broadcast_buffers=False"),
            ).to_dict())  # fmt: skip
    return records if dist.get_rank() == 0 else []


def _numel(shapes) -> int:
    n = 0
    for shape in shapes:
        m = 1
        for d in shape:
            m *= d
        n += m if shape else 0
    return n


# --- the paper model -----------------------------------------------------------------------------


def baseline_steps(path: Path = BASELINE) -> dict[tuple[str, str], tuple[float, str]]:
    """(model, framework) -> (fastest float32 step in ms, its impl) on the H100 baseline."""
    data = json.loads(Path(path).read_text())
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for r in data["bench"]:
        if r["dtype"] != "float32":
            continue
        fw = "jax" if r["impl"].startswith("jax") else "torch"
        key = (r["model"], fw)
        if key not in best or r["step_ms_median"] < best[key][0]:
            best[key] = (r["step_ms_median"], f"{r['impl']}, batch {r['batch_size']}")
    return best


def paper(counts: list[dict], baseline: Path = BASELINE, gpus: int = GPUS) -> list[dict]:
    """The communication time of one step on ``gpus`` GPUs for each counted (model,
    framework, mode) and each link: ``n * latency + 2 (W-1)/W * bytes / busbw`` (every
    collective as a ring all-reduce), and the part on the critical path (BatchNorm's
    collectives and DDP's buffer broadcast, which no compute hides) against the H100
    baseline's step time."""
    steps = baseline_steps(baseline)
    out = []
    for c in counts:
        if c["source"] not in ("stablehlo (lowered)", "torch.profiler") or (c["model"], c["framework"]) not in steps:
            continue
        step_ms, impl = steps[(c["model"], c["framework"])]
        for link in LINKS:
            ring = 2 * (gpus - 1) / gpus
            comm = c["collectives"] * link.latency + ring * c["bytes_per_step"] / link.busbw
            fwd = (c["critical_collectives"] or 0) * link.latency + ring * (c["critical_bytes"] or 0) / link.busbw
            out.append(CommModelRecord(
                model=c["model"], framework=c["framework"], bn_mode=c["bn_mode"], link=link.name, gpus=gpus,
                collectives=c["collectives"], bytes_per_step=c["bytes_per_step"], comm_ms=1e3 * comm,
                critical_ms=1e3 * fwd, h100_step_ms=step_ms, h100_impl=impl, comm_fraction=1e3 * comm / step_ms,
                critical_fraction=1e3 * fwd / step_ms,
            ).to_dict())  # fmt: skip
    return out


# --- step times on this machine ------------------------------------------------------------------


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def measure(run_window, steps_per_window: int, windows: int) -> tuple[list[float], float]:
    """Per-step milliseconds of ``windows`` windows of ``steps_per_window`` steps
    (``run_window(n)`` runs n steps and waits for them), and the load average seen."""
    per_step, loads = [], [_load()]
    for _ in range(windows):
        t = time.perf_counter()
        run_window(steps_per_window)
        per_step.append(1e3 * (time.perf_counter() - t) / steps_per_window)
    loads.append(_load())
    return per_step, max(loads)


def step_record(framework, name, processes, mode, batch, per_step, compile_s, steps, load, pinned) -> dict:
    q = statistics.quantiles(per_step, n=10) if len(per_step) > 1 else per_step * 9
    median = statistics.median(per_step)
    return StepTimeRecord(
        framework=framework, model=name, processes=processes, bn_mode=mode, batch_per_device=batch,
        step_ms_median=median, step_ms_p10=q[0], step_ms_p90=q[-1], samples_per_s=1e3 * batch * processes / median,
        compile_s=compile_s, windows=len(per_step), steps_per_window=steps, load_avg=load, cpu_count=os.cpu_count(),
        pinned=pinned,
    ).to_dict()  # fmt: skip


def time_jax(w, models=("mlp", "cnn"), windows: int = 7, window_s: float = 0.25, pinned: bool = False) -> list[dict]:
    """Step times of the data-parallel linen step on the mesh ``w`` (one device per
    process), synchronised and per-device BatchNorm; process 0 returns the records."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import flaxbn.train as ftrain
    from compare import registry
    from flaxbn import parallel

    records = []
    for name in models:
        spec, batch = registry.get(name), BATCH_PER_DEVICE.get(name, 32)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch * w.devices, *spec.flax_input_shape)).astype(np.float32)
        y = rng.integers(0, 10, batch * w.devices).astype(np.int32)
        variables = jax.jit(lambda k, x: spec.build_linen().init(k, x, train=False))(jax.random.key(0), x[:2])
        gx, gy = (parallel.put(w.mesh, a, parallel.P(parallel.AXIS)) for a in (x, y))
        key, tx = parallel.put(w.mesh, jax.random.key(1)), ftrain.sgd(0.1, momentum=0.9)
        for mode in ("per_device", "sync"):
            model = spec.build_linen(bn_axis_name=parallel.AXIS if mode == "sync" else None)
            box = [parallel.linen_state(w.mesh, variables, tx, mode)]
            step = parallel.linen_step(w.mesh, model, tx, mode)
            t = time.perf_counter()
            box[0], loss = step(box[0], gx, gy, key)
            jax.block_until_ready(loss)
            compile_s = time.perf_counter() - t

            def window(n, box=box, step=step):
                for _ in range(n):
                    box[0], loss = step(box[0], gx, gy, key)
                jax.block_until_ready(loss)

            window(2)  # warm-up
            t = time.perf_counter()
            window(3)
            n = max(1, int(window_s / ((time.perf_counter() - t) / 3)))
            n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))  # every process the same step count
            per_step, load = measure(window, n, windows)
            records.append(step_record("jax", name, w.processes, mode, batch, per_step, compile_s, n, load, pinned))
    return records if jax.process_index() == 0 else []


def time_torch(models=("mlp", "cnn"), windows: int = 7, window_s: float = 0.25, pinned: bool = False) -> list[dict]:
    """The same for torch: DDP, one rank per process, ``torchbn`` SyncBatchNorm or per-device."""
    import torch.distributed as dist

    from compare.parallel import torch_worker

    records = []
    for name in models:
        batch = BATCH_PER_DEVICE.get(name, 32)
        for mode in ("per_device", "sync"):
            ddp, opt, (x, y) = torch_worker.ddp_setup(name, mode, batch)
            t = time.perf_counter()
            torch_worker.step(ddp, opt, x, y)
            compile_s = time.perf_counter() - t  # eager: the first step's extra cost

            def window(n, ddp=ddp, opt=opt, x=x, y=y):
                for _ in range(n):
                    torch_worker.step(ddp, opt, x, y)

            window(2)
            t = time.perf_counter()
            window(3)
            n = torch_worker.agree(max(1, int(window_s / ((time.perf_counter() - t) / 3))))
            per_step, load = measure(window, n, windows)
            size = dist.get_world_size()
            records.append(step_record("torch", name, size, mode, batch, per_step, compile_s, n, load, pinned))
    return records if dist.get_rank() == 0 else []
