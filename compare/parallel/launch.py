"""Starting the processes of one data-parallel job on this machine, and watching them.

* JAX: :func:`jax_job` starts one ``python -m compare.parallel.jax_worker`` per process,
  each told the coordinator (process 0, ``127.0.0.1:<free port>``), the process count, its
  id and its local CPU device count: what ``jax.distributed.initialize`` needs on any
  cluster.
* torch: :func:`torchrun_job` starts ``python -m torch.distributed.run`` (torchrun, the
  launcher users use), which starts the ranks of ``python -m compare.parallel.torch_worker``.

Every process gets this checkout first on ``PYTHONPATH``, one thread, its own session (so
its children are stopped with it) and a log file. The launcher waits on each child in a
thread that notes when it ended: the first process to end badly is the one named. When a
process dies, the others are stopped at once (SIGTERM, then SIGKILL after
``GRACE_S``): JAX's gloo collectives notice a dead peer without naming it and the runtime
then aborts the survivors, or they wait for the coordinator's heartbeat timeout (100 s by
default); torchrun stops the other ranks itself and prints the failed rank, which
:class:`WorkerFailed` repeats. Whatever happens (a failure, a timeout, Ctrl-C, SIGTERM),
no child outlives the call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRACE_S = 1.0  # between SIGTERM and SIGKILL when stopping the survivors (JAX catches SIGTERM)
POLL_S = 0.05


class WorkerFailed(RuntimeError):
    """A process of a data-parallel job ended badly (or the job ran past its time limit).
    ``rank`` is the first process to fail (None for a timeout), ``stopped_s`` how long
    stopping the others took."""

    def __init__(self, message: str, *, rank: int | None, returncode: int | None, stopped_s: float):
        super().__init__(message)
        self.rank, self.returncode, self.stopped_s = rank, returncode, stopped_s


@dataclasses.dataclass(frozen=True)
class Fault:
    """Kill process ``rank`` with ``sig`` once the file ``after`` exists (a mid-run fault)."""

    rank: int
    after: Path
    sig: int = signal.SIGKILL


@dataclasses.dataclass
class Job:
    """What a finished job reports: its wall time, its logs, and (with a fault) when the
    fault was injected and when the launcher noticed the death."""

    seconds: float
    logs: dict[int, Path]
    killed_at: float | None = None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(threads: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a worker: this checkout first on the path, CPU only, ``threads``
    threads for torch (OpenMP) and XLA."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    xla = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if threads == 1 else ""
    return {
        **os.environ,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
        "JAX_PLATFORMS": "cpu",
        "OMP_NUM_THREADS": str(threads),
        "XLA_FLAGS": xla,
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "TORCHELASTIC_ERROR_FILE": "",
        **extra,
    }


def jax_job(
    task: str,
    processes: int,
    local_devices: int,
    out: Path,
    args: dict | None = None,
    *,
    timeout_s: float = 600,
    fault: Fault | None = None,
    pin: bool = False,
) -> Job:
    """Run ``task`` of ``compare.parallel.jax_worker`` in ``processes`` processes of
    ``local_devices`` CPU devices each. ``pin``: process i on CPU core i (timings)."""
    out = Path(out).resolve()  # the workers run in out: a relative path would nest inside itself
    out.mkdir(parents=True, exist_ok=True)
    coordinator = f"127.0.0.1:{free_port()}"
    commands = {
        i: [
            sys.executable, "-m", "compare.parallel.jax_worker", task, "--out", str(out),
            "--coordinator", coordinator, "--processes", str(processes), "--process-id", str(i),
            "--local-devices", str(local_devices), "--args", json.dumps(args or {}),
        ]
        for i in range(processes)
    }  # fmt: skip
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    pins = {i: sorted(cores)[i % len(cores)] for i in commands} if pin and cores else {}
    return run_commands(commands, out, "jax_" + task.replace(",", "+"), timeout_s, fault, pins=pins, names="process")


def torchrun_job(
    task: str,
    processes: int,
    out: Path,
    args: dict | None = None,
    *,
    timeout_s: float = 600,
    fault: Fault | None = None,
) -> Job:
    """Run ``task`` of ``compare.parallel.torch_worker`` under torchrun with ``processes``
    ranks on this machine (gloo on CPU). The ranks write their pids to ``out`` so that a
    :class:`Fault` can reach them."""
    out = Path(out).resolve()  # the workers run in out: a relative path would nest inside itself
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--monitor-interval", "0.1",
        "-m", "compare.parallel.torch_worker", task, "--out", str(out), "--args", json.dumps(args or {}),
    ]  # fmt: skip
    return run_commands({0: command}, out, "torch_" + task.replace(",", "+"), timeout_s, fault, names="torchrun")


def run_commands(
    commands: dict[int, list[str]],
    out: Path,
    tag: str,
    timeout_s: float,
    fault: Fault | None = None,
    *,
    pins=None,
    names: str = "process",
) -> Job:
    """Start ``commands`` (rank -> argv) as one job and watch it (see the module docstring):
    logs in ``out/<tag>.<rank>.log``; :class:`WorkerFailed` when one ends badly or time runs out."""
    logs = {i: out / f"{tag}.{i}.log" for i in commands}
    procs: dict[int, subprocess.Popen] = {}
    ended: queue.Queue = queue.Queue()
    start = time.monotonic()
    with _LOCK:
        _RUNNING.append(procs)
    try:
        for i, cmd in commands.items():
            core = (pins or {}).get(i)
            with open(logs[i], "w") as log:
                procs[i] = subprocess.Popen(
                    cmd, cwd=str(out), env=environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            if core is not None:  # before the child starts its threads, which inherit it
                os.sched_setaffinity(procs[i].pid, {core})
            threading.Thread(target=lambda i=i: ended.put((i, procs[i].wait(), time.monotonic())), daemon=True).start()
        return _watch(procs, ended, logs, start, timeout_s, fault, out, names)
    finally:
        _stop(procs)
        with _LOCK:
            _RUNNING.remove(procs)


_RUNNING: list[dict[int, subprocess.Popen]] = []  # the processes of every job being watched, in any thread
_LOCK = threading.Lock()


def stop_all() -> None:
    """Stop every job's processes now (for a caller interrupted while jobs run in other threads)."""
    with _LOCK:
        jobs = list(_RUNNING)
    for procs in jobs:
        _stop(procs)


def _watch(procs, ended: queue.Queue, logs, start: float, timeout_s: float, fault, out: Path, names: str) -> Job:
    done: set[int] = set()
    killed_at = None
    while len(done) < len(procs):
        if fault is not None and killed_at is None and fault.after.exists():
            pid = _pid(procs, fault.rank, out, names)
            if pid is not None:
                os.kill(pid, fault.sig)
                killed_at = time.monotonic()
        try:
            i, code, when = ended.get(timeout=POLL_S)
        except queue.Empty:
            if time.monotonic() - start > timeout_s:
                running = sorted(set(procs) - done)
                stopped = _stop(procs)
                raise WorkerFailed(
                    f"{names} {running} still running after the time limit of {timeout_s:.0f} s; stopped in "
                    f"{stopped:.1f} s. Logs: {', '.join(str(logs[r]) for r in running)}",
                    rank=None,
                    returncode=None,
                    stopped_s=stopped,
                ) from None
            continue
        done.add(i)
        if code != 0:
            noticed = time.monotonic()
            stopped = _stop(procs)
            raise _failure(i, code, when - start, noticed, stopped, procs, logs, names, killed_at)
    return Job(time.monotonic() - start, logs, killed_at)


def _pid(procs, rank: int, out: Path, names: str) -> int | None:
    """A rank's pid: the launcher's own child for JAX, the pid file a torchrun rank writes."""
    if names == "process":
        return procs[rank].pid
    f = out / f"pid.{rank}"
    return int(f.read_text()) if f.exists() and f.read_text().strip() else None


def _failure(i, code, after_s, noticed, stopped_s, procs, logs, names, killed_at) -> WorkerFailed:
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    tail = _tail(logs[i])
    if names == "torchrun":  # torchrun names the rank that failed first ("Root Cause")
        m = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", tail, flags=re.S)
        rank = int(m.group(1)) if m else None
        rank_code = int(m.group(2)) if m else code
        rank_how = f"was killed by {signal.Signals(-rank_code).name}" if rank_code < 0 else f"exited with {rank_code}"
        who = f"rank {rank} {rank_how} (torchrun {how})" if m else f"torchrun {how} (no rank named)"
        i, code = (rank if m else None), rank_code
    else:
        who = f"process {i} (pid {procs[i].pid}) {how}"
    others = sorted(set(procs) - {i}) if names == "process" else "the other ranks (torchrun stopped them)"
    since_kill = f"; {noticed - killed_at:.2f} s after the fault was injected" if killed_at else ""
    return WorkerFailed(
        f"{who} {after_s:.1f} s after the start{since_kill}; stopped {others} in {stopped_s:.2f} s. "
        f"Its log ({logs[0] if names == 'torchrun' else logs[i]}) ends:\n{tail[-1500:]}",
        rank=i,
        returncode=code,
        stopped_s=(noticed - killed_at + stopped_s) if killed_at else stopped_s,
    )


def _tail(path: Path, chars: int = 6000) -> str:
    with contextlib.suppress(OSError):
        text = path.read_text(errors="replace")
        lines = [line for line in text.splitlines() if "[Gloo]" not in line]
        return "\n".join(lines)[-chars:]
    return ""


def _stop(procs: dict[int, subprocess.Popen]) -> float:
    """SIGTERM every process group still alive, SIGKILL after ``GRACE_S``; returns the seconds it took."""
    start = time.monotonic()
    alive = [p for p in procs.values() if p.poll() is None]
    for p in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = start + GRACE_S
    for p in alive:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs.values():  # the whole group: a torchrun's ranks, an exited leader's children
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=5)
    return time.monotonic() - start


def read_json(out: Path, name: str):
    """A result a worker wrote (process 0 writes; the file is replaced atomically)."""
    return json.loads((Path(out) / name).read_text())
