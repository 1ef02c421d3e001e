"""The ``distributed`` suite of ``compare.run``: data parallelism on the real engines.

Quick (the default, a few minutes on 2 cores): JAX jobs of 2 x 2, 4 x 1, 1 x 4 and 2 x 1
processes x CPU devices under ``jax.distributed``, torch jobs of 2 and 4 ranks under
torchrun; the checks inside each job, then across jobs: the same global devices split
into processes otherwise give the same run, a checkpoint resumes on another process
count (and device count), a killed process stops the job in bounded time with its rank
named and leaves the last checkpoint whole, Flax's and torch's synchronised statistics on
the same uneven shards; the collectives per step counted, the paper model, and step times
with 1 and 2 processes. ``--full`` adds the cnn to the 4-process checks and the
single-process simulated checks on 2, 4 and 8 devices.
"""

from __future__ import annotations

import argparse
import concurrent.futures
from pathlib import Path

import numpy as np

from compare.suite import Progress, Saved, Suite

DROP = 0.5
RUNS = [{"api": a, "bn_mode": m, "dropout": DROP} for a in ("linen", "nnx") for m in ("sync", "per_device")]
NODROP = [{"api": "linen", "bn_mode": "sync", "dropout": 0.0}]  # a resume on another device count
STEPS, SAVE_AT = 5, 3
KILL_LIMIT_S = 15.0  # from the kill to every process stopped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed suite")
    g.add_argument(
        "--dist-part",
        choices=["all", "checks", "cost"],
        default="all",
        help="distributed: the multi-process checks, the cost (counts, paper model, step times), or both",
    )
    g.add_argument("--dist-windows", type=int, default=5, help="distributed: timed windows per step-time record")
    g.add_argument("--dist-window-s", type=float, default=0.2, help="distributed: seconds per timed window")
    g.add_argument("--dist-pin", action="store_true", help="distributed: process i on core i while timing")


def _record(check, diff, tol_name, framework, bn_mode, devices, processes, launcher, **extra) -> dict:
    from compare.checks import tolerances
    from compare.records import DistributedRecord

    t = tolerances.get(tol_name)
    return DistributedRecord(framework=framework, devices=devices, bn_mode=bn_mode, check=check,
                             max_abs_diff=diff.max_abs, tol=t.bound(diff.scale), ok=t.holds(diff.max_abs, diff.scale),
                             processes=processes, launcher=launcher, **extra).to_dict()  # fmt: skip


def _arrays(path: str | Path) -> dict[str, np.ndarray]:
    from compare.io.checkpoint import read_arrays

    return read_arrays(path)[0]


def compare_checkpoints(a: str | Path, b: str | Path, *, same_shapes_only: bool = False):
    """The largest difference between two checkpoints of one model and optimizer: over the
    floating-point arrays, with the integer ones (steps, counters, PRNG key data) required
    equal (an infinite difference when not). ``same_shapes_only`` leaves out arrays of
    another shape (per-device statistics of another device count)."""
    from compare.checks import diffs

    x, y = _arrays(a), _arrays(b)
    if set(x) != set(y):
        raise ValueError(f"{a} and {b} hold other arrays: {sorted(set(x) ^ set(y))}")
    keys = [k for k in x if not same_shapes_only or x[k].shape == y[k].shape]
    floats = [k for k in keys if x[k].dtype.kind == "f"]
    exact = all(np.array_equal(x[k], y[k]) for k in keys if k not in floats)
    d = diffs.tree_diff({k: x[k].astype(np.float64) for k in floats}, {k: y[k].astype(np.float64) for k in floats})
    return d if exact else diffs.Diff(float("inf"), d.scale)


def _name(run: dict) -> str:
    return f"{run['api']}-{run['bn_mode']}-drop{run['dropout']}"


def _job(records: list[dict], framework: str, what: str, start) -> bool:
    """Run one job; a job that fails is a failed record naming what failed (its error
    names the process and its log), and the checks that need it are left out."""
    from compare.parallel import launch
    from compare.records import DistributedRecord

    try:
        start()
        return True
    except launch.WorkerFailed as e:
        records.append(DistributedRecord(framework=framework, devices=0, bn_mode="sync", check=f"the job ran: {what}",
                                         max_abs_diff=None, tol=None, ok=False, detail=str(e)[:2000]).to_dict())  # fmt: skip
        return False


def jax_jobs(folder: Path, full: bool, progress) -> tuple[list[dict], dict]:
    """The JAX jobs and the checks across them; returns the records and the uneven statistics by device count."""
    from compare.parallel import launch

    ckpt, uneven, records = {}, {}, []
    linen = [r for r in RUNS if r["api"] == "linen"]
    four = RUNS if full else linen  # the 4-process job: every run with --full, linen's quick
    subset = {} if full else {"checks": ["synchronised", "per_device", "dropout_masks"]}
    plan = [
        ("2x2", 2, 2, "checks,train", {"checks": {"models": ["mlp", "cnn"], "training_models": ["mlp", "cnn"] if full
                                                   else ["mlp"]},
                                        "train": {"runs": RUNS + NODROP, "steps": STEPS, "save_at": [SAVE_AT, STEPS]}}),
        ("4x1", 4, 1, "checks,train,resume", {"checks": {"models": ["mlp", "cnn"] if full else ["mlp"], **subset},
                                              "train": {"runs": four, "steps": STEPS}}),
        ("1x4", 1, 4, "train,resume", {"train": {"runs": RUNS, "steps": STEPS}}),
        ("2x1", 2, 1, "resume,uneven", {}),
    ]  # fmt: skip
    runs = {"2x2": RUNS, "4x1": four, "1x4": RUNS}

    def start(tag, p, local, tasks, args) -> bool:
        out = folder / f"jax-{tag}"
        if "resume" in tasks:  # from the 2x2 run's checkpoint after SAVE_AT steps
            same = [{**r, "from": ckpt["2x2"][_name(r)][0]} for r in runs.get(tag, [])]
            other = [{**r, "from": ckpt["2x2"][_name(r)][0]} for r in NODROP]
            other += [{**r, "from": ckpt["2x2"][_name(r)][0], "resplit": s} for r in (RUNS if full else linen)
                      if r["bn_mode"] == "per_device" for s in ("device0", "mean")]  # fmt: skip
            args["resume"] = {"runs": same if p * local == 4 else other, "steps": STEPS}
        what = f"{p} processes x {local} devices ({tasks})"
        return _job(records, "cross", what, lambda: launch.jax_job(tasks, p, local, out, args, timeout_s=900))

    # three stages: the resumes need the 2 x 2 run's checkpoints; the 1-process job (one core)
    # runs beside the 2-process one
    for stage in ([plan[0]], [plan[1]], plan[2:]):
        if stage[0][0] != "2x2" and "2x2" not in ckpt:
            break
        with concurrent.futures.ThreadPoolExecutor(len(stage)) as pool:
            ran = list(pool.map(lambda job: start(*job), stage))
        for (tag, p, local, tasks, _), ok in zip(stage, ran, strict=True):
            progress(f"jax, {p} processes x {local} devices", None)
            if not ok:
                continue
            out = folder / f"jax-{tag}"
            for task in ("checks", "uneven"):
                if task in tasks:
                    found = launch.read_json(out, f"{task}.json")
                    records += found["records"]
                    uneven |= {p * local: found["uneven"]} if found["uneven"] else {}
            if "train" in tasks:
                ckpt[tag] = launch.read_json(out, "train.json")["checkpoints"]
            if "resume" in tasks:
                ckpt[f"{tag}/resumed"] = launch.read_json(out, "resume.json")["resumed"]
    base = dict(launcher="jax.distributed", devices=4)
    for r in RUNS:
        for tag, p in (("4x1", 4), ("1x4", 1)):
            if r not in runs[tag] or not {"2x2", tag, f"{tag}/resumed"} <= set(ckpt):
                continue
            final = ckpt["2x2"][_name(r)][-1]
            what = "the single-process simulated run" if p == 1 else f"{p} processes x 1 device"
            records.append(_record(f"process split: 2 processes x 2 devices == {what} ({STEPS} steps, {_name(r)})",
                                   compare_checkpoints(ckpt[tag][_name(r)][-1], final), "parallel.split",
                                   r["api"], r["bn_mode"], processes=p, **base))  # fmt: skip
            resumed = ckpt[f"{tag}/resumed"][_name(r)]
            records.append(_record(f"resume: saved by 2 x 2 at step {SAVE_AT}, resumed on {p} x {4 // p} == "
                                   f"uninterrupted ({_name(r)})", compare_checkpoints(resumed["final"], final),
                                   "parallel.split", r["api"], r["bn_mode"], processes=p, **base))  # fmt: skip
    for key, resumed in ckpt.get("2x1/resumed", {}).items():
        run = next(r for r in RUNS + NODROP if key.split("/")[0] == _name(r))
        final = ckpt["2x2"][_name(run)][-1]
        diff = compare_checkpoints(resumed["final"], final, same_shapes_only=True)
        if run["bn_mode"] == "sync":
            records.append(_record(f"resume: saved on 4 devices at step {SAVE_AT}, resumed on 2 processes x 1 device "
                                   f"== uninterrupted, synchronised BN ({_name(run)})", diff, "parallel.resume",
                                   run["api"], "sync", 2, 2, "jax.distributed"))  # fmt: skip
        else:
            records.append(_differs(f"resume per-device BN from 4 devices on 2 with resplit={key.split('/')[1]!r}: "
                                    "each device's running statistics start from the chosen ones (they do not enter a "
                                    "training step); the ghost batch grows from 8 to 16 rows, so the parameters differ "
                                    "from the uninterrupted run's", diff, run["api"], 2))  # fmt: skip
    return records, {"uneven": uneven}


def _differs(check: str, diff, framework: str, devices: int, launcher: str = "jax.distributed") -> dict:
    from compare.records import DistributedRecord

    return DistributedRecord(framework=framework, devices=devices, bn_mode="per_device", check=check,
                             max_abs_diff=diff.max_abs, tol=1e-3, ok=diff.max_abs > 1e-3, processes=devices,
                             launcher=launcher).to_dict()  # fmt: skip


def torch_jobs(folder: Path, full: bool, progress) -> tuple[list[dict], dict]:
    from compare.parallel import launch

    runs = [{"bn_mode": m, "dropout": 0.0} for m in ("sync", "per_device")]
    out2, out4 = folder / "torch-2", folder / "torch-4"
    records, uneven = [], {}
    train = {"train": {"runs": runs, "steps": STEPS, "save_at": [SAVE_AT]}}
    ran2 = _job(records, "torch", "2 ranks (checks,train)",
                lambda: launch.torchrun_job("checks,train", 2, out2, train, timeout_s=600))  # fmt: skip
    progress("torch, 2 ranks (torchrun)", None)
    if not ran2:
        return records, {"uneven": uneven}
    trained = launch.read_json(out2, "train.json")
    resume = [{**r, "from": trained[r["bn_mode"]]["checkpoints"][0]} for r in runs]
    args4 = {
        "checks": {} if full else {"checks": ["synchronised", "uneven"]},
        "resume": {"runs": resume, "steps": STEPS},
    }
    ran4 = _job(records, "torch", "4 ranks (checks,resume)",
                lambda: launch.torchrun_job("checks,resume", 4, out4, args4, timeout_s=600))  # fmt: skip
    progress("torch, 4 ranks (torchrun)", None)
    for n, out, ran in ((2, out2, True), (4, out4, ran4)):
        if ran:
            found = launch.read_json(out, "checks.json")
            records += found["records"]
            uneven |= {n: found["uneven"]} if found["uneven"] else {}
    if not ran4:
        return records, {"uneven": uneven}
    resumed = launch.read_json(out4, "resume.json")
    for r in runs:
        final, again = trained[r["bn_mode"]]["checkpoints"][-1], resumed[r["bn_mode"]]["checkpoints"][-1]
        diff = compare_checkpoints(again, final)
        if r["bn_mode"] == "sync":
            records.append(_record(f"resume: saved by 2 ranks at step {SAVE_AT}, resumed on 4 ranks == uninterrupted, "
                                   "SyncBatchNorm (torchbn)", diff, "parallel.resume", "torch", "sync", 4, 4,
                                   "torchrun"))  # fmt: skip
        else:
            records.append(_differs("resume per-device BN (rank 0's buffers) from 2 ranks on 4: every rank starts "
                                    "from rank 0's buffers, the ghost batch shrinks from 16 to 8 rows, so the run "
                                    "differs from the uninterrupted one", diff, "torch", 4, "torchrun"))  # fmt: skip
    return records, {"uneven": uneven}


def cross_uneven(jax_uneven: dict, torch_uneven: dict) -> list[dict]:
    """Flax's equal-weight against torch's count-weighted statistics, the same uneven shards."""
    from compare.checks import diffs
    from compare.parallel import uneven_shards
    from compare.records import DistributedRecord

    out = []
    for n in sorted(set(jax_uneven) & set(torch_uneven)):
        x, valid = uneven_shards(n)
        counted = x[valid[:, 0]].mean(0)
        j, t = np.asarray(jax_uneven[n]["mean"]), np.asarray(torch_uneven[n]["mean"])
        d = diffs.max_abs(j, t)
        out.append(DistributedRecord(
            framework="cross", devices=n, bn_mode="sync", processes=n, max_abs_diff=d, tol=1e-3, ok=d > 1e-3,
            check=f"uneven shards {jax_uneven[n]['counts']}: Flax axis_name BN (mean {j.round(3).tolist()}) != torch "
                  f"SyncBatchNorm (mean {t.round(3).tolist()}, the valid rows' {counted.round(3).tolist()})",
        ).to_dict())  # fmt: skip
    return out


def kills(folder: Path, progress) -> list[dict]:
    """A process killed mid-run: the launcher stops the others and names it; the last checkpoint loads."""
    from compare.parallel import launch
    from compare.records import DistributedRecord

    records = []
    run = {"api": "linen", "bn_mode": "sync", "dropout": DROP}
    jobs = [
        ("jax", lambda out, fault: launch.jax_job("loop", 2, 1, out, {"loop": {"run": run, "steps": 100_000}},
                                                  timeout_s=300, fault=fault)),
        ("torch", lambda out, fault: launch.torchrun_job("loop", 2, out, {"loop": {"run": {"bn_mode": "sync",
                                                         "dropout": DROP}, "steps": 100_000}}, timeout_s=300,
                                                         fault=fault)),
    ]  # fmt: skip
    for framework, start in jobs:
        out = folder / f"kill-{framework}"
        fault = launch.Fault(rank=1, after=out / "ckpt" / "latest.safetensors")
        try:
            start(out, fault)
            ok, seconds, detail = False, None, "the job finished: the fault was never injected"
        except launch.WorkerFailed as e:
            seconds = e.stopped_s
            ok = e.rank == 1 and seconds <= KILL_LIMIT_S
            detail = str(e).splitlines()[0]
        intact, step = _intact(framework, out / "ckpt" / "latest.safetensors")
        records.append(DistributedRecord(
            framework=framework if framework == "torch" else "linen", devices=2, bn_mode="sync", processes=2,
            launcher="torchrun" if framework == "torch" else "jax.distributed", seconds=seconds,
            check=f"rank 1 killed (SIGKILL) mid-run: every process stopped within {KILL_LIMIT_S:.0f} s, rank 1 named",
            max_abs_diff=None, tol=None, ok=ok, detail=detail,
        ).to_dict())  # fmt: skip
        records.append(DistributedRecord(
            framework=framework if framework == "torch" else "linen", devices=2, bn_mode="sync", processes=2,
            launcher="torchrun" if framework == "torch" else "jax.distributed", max_abs_diff=None, tol=None,
            ok=intact, check="the last checkpoint before the kill loads, is finite and holds the last step done",
            detail=f"step {step}" if intact else f"unreadable: {step}",
        ).to_dict())  # fmt: skip
        progress(f"{framework}: a rank killed mid-run", None)
    return records


def _intact(framework: str, path: Path) -> tuple[bool, object]:
    """Whether the checkpoint at ``path`` reads, is finite and holds the last step the job
    reported done (the ``progress`` file beside ``ckpt/``, written after each save); its step."""
    from compare.io.checkpoint import CheckpointError, read_arrays

    try:
        arrays, header = read_arrays(path)
        finite = all(np.isfinite(a).all() for a in arrays.values() if a.dtype.kind == "f")
        step = int(header["step"]) if "step" in header else int(arrays["state.step"])
        done = path.parent.parent / "progress"
        last = int(done.read_text()) if done.exists() else step
        return finite and step >= last, step
    except (CheckpointError, OSError, ValueError, KeyError) as e:
        return False, str(e)


def count_job(folder: Path) -> tuple[list[dict], list[dict]]:
    """JAX's collectives counted: one process of 2 devices (the program 2 processes run, lowered once)."""
    from compare.parallel import launch

    out, failed = folder / "jax-count", []
    args = {"cost": {"models": COUNTED}}
    if _job(failed, "jax", "the collective count", lambda: launch.jax_job("cost", 1, 2, out, args, timeout_s=900)):
        return launch.read_json(out, "cost.json")["records"], failed
    return [], failed


COUNTED = ["mlp", "cnn", "resnet18_cifar"]


def cost_jobs(folder: Path, args: argparse.Namespace, progress) -> tuple[list[dict], list[dict], list[dict]]:
    """torch's collectives counted (2 ranks) and the step times of 1 and 2 processes of one
    device each, both frameworks, each job alone on the machine; and a failed record for
    each job that failed."""
    from compare.parallel import launch

    timing = {"windows": args.dist_windows, "window_s": args.dist_window_s, "pinned": args.dist_pin}
    counts, steps, failed = [], [], []
    for p in (1, 2):
        out = folder / f"jax-timing-{p}"
        start = lambda: launch.jax_job("timing", p, 1, out, {"timing": timing}, pin=args.dist_pin)  # noqa: E731
        if _job(failed, "jax", f"step times, {p} process(es)", start):
            steps += launch.read_json(out, "timing.json")["records"]
        progress(f"jax step times, {p} process(es)", None)
        tasks = "timing,cost" if p == 2 else "timing"
        out = folder / f"torch-timing-{p}"
        start = lambda: launch.torchrun_job(tasks, p, out, {"timing": timing, "cost": {"models": COUNTED}})  # noqa: E731
        if _job(failed, "torch", f"step times, {p} rank(s)", start):
            steps += launch.read_json(out, "timing.json")["records"]
            counts += launch.read_json(out, "cost.json")["records"] if p == 2 else []
        progress(f"torch step times, {p} rank(s)", None)
    return counts, steps, failed


def _distributed(args: argparse.Namespace, progress: Progress, saved: Saved) -> dict:
    """The multi-process checks and the cost; the jobs work in ``<out>/distributed-jobs/`` (logs, checkpoints)."""
    import time

    from compare.parallel import cost, jax_checks, launch

    folder = Path(args.out) / "distributed-jobs"
    full, part = args.full, args.dist_part
    progress(None, (8 + full if part != "cost" else 0) + (4 if part != "checks" else 0))
    started = time.monotonic()
    out: dict = {"distributed": []}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        # JAX's count (one process, one core's work) runs beside the checks; the timings run alone
        counting = pool.submit(count_job, folder) if part != "checks" else None
        if part != "cost":
            records, jx = jax_jobs(folder, full, progress)
            t_records, tr = torch_jobs(folder, full, progress)
            out["distributed"] += records + t_records + cross_uneven(jx["uneven"], tr["uneven"])
            out["distributed"] += kills(folder, progress)
            if full:
                out["distributed"] += jax_checks.run_in_subprocess((2, 4, 8))
                progress("jax, simulated devices in one process (2, 4, 8)", None)
        if counting is not None:
            jax_counts, failed = counting.result()
            counts, steps, more = cost_jobs(folder, args, progress)
            counts = jax_counts + counts
            out["distributed"] += failed + more
            out |= {"distributed_collectives": counts, "distributed_comm_model": cost.paper(counts),
                    "distributed_steps": steps}  # fmt: skip
    finally:  # interrupted (SIGTERM, Ctrl-C): no job of another thread outlives the suite
        launch.stop_all()
        pool.shutdown(wait=True)
    meta = {"windows": args.dist_windows, "window_s": args.dist_window_s, "pinned": args.dist_pin, "part": part,
            "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    return {**out, "meta": {"distributed": meta}}


DISTRIBUTED = Suite(
    "distributed",
    "data parallelism on the real engines: JAX under jax.distributed (2 and 4 processes), torch under torchrun "
    "(2 and 4 ranks), checkpoints and faults across processes, and what synchronised BatchNorm costs",
    _distributed,
    add_arguments,
)
