"""Running the claims' experiments: one *unit* is one seed of one dataset in one
framework (:func:`run_seed`: its planned runs, then its learning-rate searches), and the
units run in worker processes whose thread counts are fixed before torch or JAX start
(:func:`run_units`).

Determinism: a unit's records depend only on its plan, dataset, seed and framework, and on
the versions and machine: every random draw is seeded from the seed, and each worker runs
torch on ``TORCH_THREADS`` thread and XLA with its Eigen thread pool off and one
intra-op thread (``WORKER_ENV``), so neither the other units, the number of workers, nor
the load of the machine changes a number. (Measured: torch's BatchNorm gives different
float32 sums on one thread and on two; XLA's small matmuls do not depend on the flags
here, but they are fixed anyway.)
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable

from compare.experiments.claims.design import ARMS, SEARCHES, Plan, search_bracket

TORCH_THREADS = 1
WORKER_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}


@dataclasses.dataclass(frozen=True)
class Unit:
    plan: Plan
    seed: int
    framework: str
    data_dir: str | None = None
    device: str = "cpu"

    @property
    def key(self) -> str:
        return f"{self.plan.dataset}/{self.framework}/{self.seed}"


def units(plans: Iterable[Plan], data_dir=None, device: str = "cpu") -> list[Unit]:
    """Every (dataset, framework, seed) of the plans, the seeds interleaved across the
    frameworks so that a run cut short has some of each."""
    out = []
    for plan in plans:
        for seed in plan.all_seeds():
            out += [
                Unit(plan, seed, fw, None if data_dir is None else str(data_dir), device)
                for fw in plan.frameworks(seed)
            ]
    return out


def _arm_runs(records: list[dict], arm: str) -> list[dict]:
    use_bn, p = ARMS[arm]
    return [
        r
        for r in records
        if r["claim"] == "learning_rate"
        and r.get("variant", "standard") == "standard"
        and r["use_bn"] == use_bn
        and (r["dropout"] > 0 if p is None else r["dropout"] == p)
    ]


def search(plan: Plan, ds, seed: int, framework: str, arm: str, criterion: str, grid: list[dict], device="cpu"):
    """The largest learning rate of one arm that meets ``criterion``, by bisection on log(lr)
    (``design.search_bracket`` says how); returns the runs it added."""
    from compare.experiments import training

    found: list[dict] = []

    def bracket():
        return search_bracket(_arm_runs(grid, arm) + found, criterion)

    def run(lr: float) -> None:
        cfg = plan.search_run(seed, arm, criterion, lr)
        found.extend(training.run_one(cfg, ds, (framework,), target=plan.target_accuracy, device=device))

    low, high = bracket()
    if low is None:
        return found
    for lr in plan.lrs_above:
        if high is not None:
            break
        if lr > low:
            run(lr)
            low, high = bracket()
    if high is None:
        return found
    for _ in range(plan.search_steps):
        run(math.sqrt(low * high))
        low, high = bracket()
    return found


def run_seed(unit: Unit) -> list[dict]:
    """Every run of one unit: the planned runs, then the learning-rate searches."""
    from compare.experiments import data, training

    plan = unit.plan
    ds = data.load(plan.dataset, unit.data_dir, unit.seed, val_fraction=plan.val_fraction,
                   test_fraction=plan.test_fraction, synthetic=plan.synthetic)  # fmt: skip
    records: list[dict] = []
    for cfg in plan.seed_runs(unit.seed):
        records += training.run_one(cfg, ds, (unit.framework,), target=plan.target_accuracy, device=unit.device)
    if "learning_rate" in plan.experiments(unit.seed):
        for arm, criterion in SEARCHES:
            records += search(plan, ds, unit.seed, unit.framework, arm, criterion, records, unit.device)
    return records


_NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def revive(value):
    """A record read back from results.json, its non-finite numbers floats again (the file
    writes them as the strings "nan", "inf", "-inf")."""
    if isinstance(value, dict):
        return {k: revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [revive(v) for v in value]
    return _NON_FINITE.get(value, value) if isinstance(value, str) else value


def thread_settings() -> dict:
    """What this process computes with: torch's thread counts, the environment that sets
    OpenMP's, MKL's and XLA's, and the versions."""
    from importlib import metadata

    import jax
    import torch

    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in WORKER_ENV},
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": {p: metadata.version(p) for p in ("numpy", "torch", "jax", "jaxlib", "flax", "optax", "scipy")},
    }


def _init_worker() -> None:
    """A worker process, before torch or JAX start: fixed thread counts; a Ctrl-C is the
    parent's to handle."""
    import signal

    os.environ.update(WORKER_ENV)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    torch.set_num_threads(TORCH_THREADS)


def _work(unit: Unit) -> tuple[str, list[dict], dict]:
    t0, c0 = time.perf_counter(), time.process_time()
    records = run_seed(unit)
    timing = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "pid": os.getpid()}
    return unit.key, records, {**timing, "settings": thread_settings()}


def _pool(workers: int):
    """``workers`` spawned processes that start with ``WORKER_ENV`` in their environment
    (so that torch and XLA read it when they start) and run ``_init_worker`` first."""
    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    try:
        return multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_units(todo: list[Unit], workers: int, done: Callable[[Unit, list[dict], dict], None]) -> None:
    """Runs every unit, ``workers`` at a time in spawned processes (0: here, in this
    process, with torch's threads fixed but XLA's as this process started them), and calls
    ``done(unit, records, timing)`` in this process as each finishes. A stop (an exception
    here, such as SIGTERM's) terminates the workers at once: what ``done`` saw is kept."""
    if workers == 0:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(TORCH_THREADS)
        try:
            for unit in todo:
                key, records, timing = _work(unit)
                done(unit, records, timing)
        finally:
            torch.set_num_threads(before)
        return
    by_key = {u.key: u for u in todo}
    pool = _pool(workers)
    try:
        for key, records, timing in pool.imap_unordered(_work, todo):
            done(by_key[key], records, timing)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
