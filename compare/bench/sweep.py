"""The benchmark: one training step (train-mode forward with BatchNorm and Dropout,
cross-entropy, backward, SGD with momentum, statistics updated), timed honestly.

Method (nanoGPT's bench.py, stretched over frameworks):

* data is generated on the device once; every implementation runs the same
  architecture, batch, optimizer (SGD lr 0.1, momentum 0.9) and dtype;
* ``compile_s`` is the time to the first finished step (tracing, compilation, first run);
  then 3 untimed warm-up steps;
* timing is in rounds: each round runs a block of steps (about ``round_seconds`` long)
  per implementation and synchronises once at its end (``block_until_ready`` on the
  loss and the new state, ``torch.cuda.synchronize``); implementations are interleaved
  and the starting one rotates, so machine noise does not favour one; the median and
  the 10th/90th percentiles are over rounds;
* ``tflops_per_s`` uses the analytic count of ``compare.bench.flops``; ``mfu`` divides it by the
  best matmul rate measured on this device in the same run and dtype (``peak_tflops_per_s``);
* ``peak_mem_bytes``: on CPU the process RSS growth while the implementation was built,
  compiled and warmed up; on GPU torch's ``max_memory_allocated`` and XLA's
  ``memory_analysis`` of the compiled step (arguments + outputs + temporaries - aliased).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from compare.bench import flops, load, peaks, runners_jax, runners_torch
from compare.bench.memory import MemoryProbe
from compare.records import BenchRecord, Speedup
from compare.registry import ModelSpec, get


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What to run: model -> batch sizes, dtypes, and how long to time."""

    models: dict[str, tuple[int, ...]]
    dtypes: tuple[str, ...] = ("float32",)
    rounds: int = 5
    round_seconds: float = 0.25
    impls: tuple[str, ...] | None = None  # None: all
    matmul_n: int = 1024
    skip: tuple[tuple[str, str], ...] = ()  # (model, impl) pairs left out, with SKIP_REASONS
    priority: tuple[tuple[str, int, str], ...] = ()  # (model, batch, dtype) groups run first, in this order
    variants: tuple[ModelSpec, ...] = ()  # models that are not in the registry, by their spec's name

    def spec(self, model: str) -> ModelSpec:
        return next((s for s in self.variants if s.name == model), None) or get(model)

    def groups(self) -> list[tuple[str, int, str]]:
        """Every (model, batch, dtype): the ``priority`` groups first, then the others in order."""
        every = [(m, b, d) for m in self.models for d in self.dtypes for b in self.models[m]]
        return [g for g in self.priority if g in every] + [g for g in every if g not in self.priority]

    def runs(self, model: str, impl: str) -> bool:
        return (self.impls is None or impl in self.impls) and (model, impl) not in self.skip


SKIP_REASONS = {
    ("cnn", "jax-scan"): "XLA:CPU runs the weight-gradient convolutions inside lax.scan many times slower "
    "than outside it (README, 'Why the cnn misses'); measured with --full only",
}


SWEEPS = {
    # Seconds, for tests of the run machinery (stopping, budget, resume): three tiny groups.
    "smoke-cpu": Sweep(
        {"mlp": (8, 16, 32)}, rounds=2, round_seconds=0.2, impls=("torch-eager", "jax-linen-jit"), matmul_n=128
    ),
    # The default run: the CPU target (batch 256), under 2 minutes on 2 cores.
    # The per-step Python cost of each NNX pattern against linen and scan: a small mlp at
    # batch 32, where dispatch, not arithmetic, sets the step time.
    "nnx-overhead-cpu": Sweep(
        {"mlp-64x64": (32,)},
        rounds=7,
        impls=("jax-linen-jit", "jax-nnx-jit", "jax-nnx-cached", "jax-nnx-split", "jax-scan", "torch-eager"),
        matmul_n=256,
        variants=(dataclasses.replace(get("mlp").replace(in_features=64, hidden=(64, 64)), name="mlp-64x64"),),
    ),
    "quick-cpu": Sweep({"mlp": (256,), "cnn": (256,)}, skip=(("cnn", "jax-scan"),)),
    "full-cpu": Sweep(
        {"mlp": (32, 128, 256, 1024, 4096), "cnn": (32, 128, 256, 512), "resnet18_cifar": (32, 128)}, rounds=7
    ),
    "quick-gpu": Sweep(
        {"mlp": (256, 4096), "cnn": (256, 1024), "resnet18_cifar": (256, 512)},
        dtypes=("float32", "bfloat16"),
        matmul_n=8192,
        # the groups the README quotes, so that a run cut short by its budget has them
        priority=(
            ("mlp", 256, "float32"),
            ("mlp", 4096, "bfloat16"),
            ("cnn", 256, "float32"),
            ("cnn", 1024, "bfloat16"),
            ("resnet18_cifar", 256, "float32"),
            ("resnet18_cifar", 512, "bfloat16"),
        ),
    ),
    "full-gpu": Sweep(
        {
            "mlp": (32, 256, 1024, 4096, 16384),
            "cnn": (32, 256, 1024, 4096),
            "resnet18_cifar": (128, 256, 512, 1024),
            "resnet18": (64, 128, 256),
            "resnet50": (128, 256),  # 224 x 224, the reference point people compare against
        },
        dtypes=("float32", "bfloat16"),
        rounds=7,
        matmul_n=8192,
    ),
}


def all_implementations(device: str) -> dict[str, Callable]:
    """name -> factory(spec, batch, dtype, device) -> runner."""
    impls = {}
    for name, kwargs in runners_torch.implementations(device).items():
        impls[name] = lambda s, b, d, dev, kw=kwargs: runners_torch.TorchRunner(s, b, d, dev, **kw)
    for name, (cls, kwargs) in runners_jax.implementations().items():
        impls[name] = lambda s, b, d, dev, cls=cls, kw=kwargs: cls(s, b, d, dev, **kw)
    return impls


# --- timing ------------------------------------------------------------------------------


def _run_block(runner, n: int) -> float:
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
        out = runner.step()
    runner.sync(out)
    return time.perf_counter() - t0


def bench_group(
    name: str | ModelSpec,
    batch: int,
    dtype: str,
    device: str,
    sweep: Sweep,
    peak: float,
    progress: Callable | None = None,
) -> list[dict]:
    """Build, compile, warm up and time every implementation for one (model, batch, dtype)."""
    spec = name if isinstance(name, ModelSpec) else sweep.spec(name)
    name = spec.name
    factories = all_implementations(device)
    names = [n for n in factories if sweep.runs(name, n)]
    step_flops = flops.train_step_flops(spec, batch)
    sheet = peaks.datasheet(_device_name(device), dtype)
    prepared = {}
    for impl in names:
        with MemoryProbe(device) as probe:
            t0 = time.perf_counter()
            runner = factories[impl](spec, batch, dtype, device)
            runner.sync(runner.step())
            compile_s = time.perf_counter() - t0
            for _ in range(3):
                runner.sync(runner.step())
            if hasattr(runner, "after_warmup"):
                runner.after_warmup()
            mem = probe.result(runner)
        one = _run_block(runner, 1)
        n = max(1, min(1000, round(sweep.round_seconds / max(one, 1e-6))))
        prepared[impl] = (runner, n, compile_s, mem)
        if progress:
            progress(f"{name} b{batch} {dtype}: compiled {impl}")
    times = {impl: [] for impl in names}
    for r in range(sweep.rounds):
        for impl in names[r % len(names) :] + names[: r % len(names)]:
            runner, n, _, _ = prepared[impl]
            times[impl].append(_run_block(runner, n) / (n * runner.steps_per_call) * 1e3)
    records = []
    for impl in names:
        runner, n, compile_s, mem = prepared[impl]
        ms = np.array(times[impl])
        median = float(np.median(ms))
        tflops = step_flops / (median / 1e3) / 1e12
        records.append(
            BenchRecord(
                model=name,
                impl=impl,
                device=device,
                dtype=dtype,
                batch_size=batch,
                step_ms_median=median,
                step_ms_p10=float(np.percentile(ms, 10)),
                step_ms_p90=float(np.percentile(ms, 90)),
                samples_per_s=batch / (median / 1e3),
                compile_s=compile_s,
                peak_mem_bytes=mem,
                tflops_per_s=tflops,
                mfu=tflops / peak if peak else None,
                peak_tflops_per_s=peak,
                mfu_datasheet=tflops / sheet if sheet else None,
                datasheet_tflops_per_s=sheet,
                flops_per_step=step_flops,
                steps_timed=n * runner.steps_per_call * sweep.rounds,
                **runner.info,
            ).to_dict()
        )
    del prepared
    return records


measure_peaks = peaks.measure  # the name of 0.1


def _device_name(device: str) -> str:
    if device != "gpu":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


def group_key(model: str, batch: int, dtype: str) -> str:
    """How a group is named in ``bench_settings``: ``model/b<batch>/<dtype>``."""
    return f"{model}/b{batch}/{dtype}"


def estimate_s(group: tuple[str, int, str], spent: dict[tuple[str, int, str], float]) -> float | None:
    """The expected seconds of ``group`` from the groups measured so far: the slowest group
    of the same model (compilation dominates and hardly depends on the batch), else twice
    the slowest group of any model, else None (nothing measured yet)."""
    same = [s for (m, _, _), s in spent.items() if m == group[0]]
    if same:
        return max(same)
    return 2 * max(spent.values()) if spent else None


def run(
    sweep: Sweep,
    device: str,
    progress: Callable | None = None,
    *,
    on_group: Callable[[list[dict], dict], None] | None = None,
    budget_s: float | None = None,
    done: frozenset[tuple[str, int, str]] = frozenset(),
) -> tuple[list[dict], dict]:
    """Every group of the sweep, in priority order; returns (records, settings).

    ``on_group(records, settings)`` is called after each finished group (to write the
    results so far). With ``budget_s``, a group whose estimated time (:func:`estimate_s`)
    does not fit in what is left is not started; ``done`` groups (already measured, for
    ``--resume``) are not run again. ``settings["groups"]`` says what happened to each
    group: ``done``, ``skipped: <why>``, or ``not reached`` while the run is on.
    """
    t_start = time.perf_counter()
    settings = {**runners_torch.configure(device), **runners_jax.configure(device)}
    settings["peak_matmul_tflops_per_s"] = peaks.measure(sweep.dtypes, device, sweep.matmul_n)
    groups = sweep.groups()
    status = settings["groups"] = {group_key(*g): "not reached" for g in groups}
    if budget_s is not None:
        settings["budget_s"] = budget_s
    settings["load_threshold"] = load.THRESHOLD
    records, spent = [], {}
    t_probe = time.perf_counter()
    before = load.probe()
    probe_s = time.perf_counter() - t_probe  # the load probes do not count against the budget
    for group in groups:
        key = group_key(*group)
        if group in done:
            status[key] = "done (in the resumed results)"
            continue
        left = None if budget_s is None else budget_s - (time.perf_counter() - t_start - probe_s)
        expected = estimate_s(group, spent)
        if left is not None and (left <= 0 or (expected is not None and expected > left)):
            status[key] = f"skipped: over the budget (expected {expected or 0:.0f} s, {max(left, 0):.0f} s left)"
            continue
        t0 = time.perf_counter()
        new = bench_group(
            group[0], group[1], group[2], device, sweep, settings["peak_matmul_tflops_per_s"][group[2]], progress
        )
        spent[group] = time.perf_counter() - t0
        t_probe = time.perf_counter()
        after = load.probe()
        probe_s += time.perf_counter() - t_probe
        share = min(before.share, after.share)
        new = [{**r, "cpu_share": share, "busy": share < load.THRESHOLD} for r in new]
        before = after
        status[key] = f"done in {spent[group]:.0f} s" + (" (machine busy)" if share < load.THRESHOLD else "")
        records += new
        if on_group:
            on_group(new, settings)
    settings["wall_s"] = time.perf_counter() - t_start
    return records, settings


def speedups(records: list[dict]) -> list[dict]:
    """Per (model, dtype, batch): the best JAX and best torch implementation and the ratio
    of their samples/s."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["dtype"], r["batch_size"]), []).append(r)
    rows = []
    for (model, dtype, batch), recs in groups.items():
        jax_best = max((r for r in recs if r["impl"].startswith("jax")), key=lambda r: r["samples_per_s"], default=None)
        torch_best = max(
            (r for r in recs if r["impl"].startswith("torch")), key=lambda r: r["samples_per_s"], default=None
        )
        if jax_best and torch_best:
            rows.append(
                Speedup(
                    model=model,
                    dtype=dtype,
                    batch_size=batch,
                    best_jax=jax_best["impl"],
                    best_torch=torch_best["impl"],
                    jax_samples_per_s=jax_best["samples_per_s"],
                    torch_samples_per_s=torch_best["samples_per_s"],
                    speedup=jax_best["samples_per_s"] / torch_best["samples_per_s"],
                    busy=any(r.get("busy") for r in recs) if any("busy" in r for r in recs) else None,
                ).to_dict()
            )
    return rows
