"""The launcher of ``compare.parallel``: it watches every process of a job, names the
first one to end badly, stops the others (and their children) in bounded time, and
leaves no process behind, whatever happens. Plain Python children: no framework needed."""

from __future__ import annotations

import os
import sys
import time

import pytest

from compare.parallel import launch

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_process_that_fails_is_named_and_the_others_are_stopped_at_once(tmp_path):
    commands = {0: SLEEP, 1: [sys.executable, "-c", "import sys, time; time.sleep(0.5); sys.exit(3)"]}
    start = time.monotonic()
    with pytest.raises(launch.WorkerFailed, match=r"process 1 \(pid \d+\) exited with status 3") as e:
        launch.run_commands(commands, tmp_path, "fail", timeout_s=60)
    assert e.value.rank == 1 and e.value.returncode == 3
    assert time.monotonic() - start < 20  # not the 60 s of the sleeper
    assert "stopped [0]" in str(e.value)


def test_the_time_limit_stops_every_process_and_says_which_were_running(tmp_path):
    with pytest.raises(launch.WorkerFailed, match=r"process \[0, 1\] still running after the time limit") as e:
        launch.run_commands({0: SLEEP, 1: SLEEP}, tmp_path, "slow", timeout_s=1)
    assert e.value.rank is None


def test_a_fault_kills_the_named_rank_once_its_file_exists_and_the_report_says_so(tmp_path):
    trigger = tmp_path / "go"
    writer = [
        sys.executable,
        "-c",
        f"import time; time.sleep(0.3); open({str(trigger)!r}, 'w').close(); time.sleep(60)",
    ]
    fault = launch.Fault(rank=0, after=trigger)
    with pytest.raises(launch.WorkerFailed, match=r"process 0 \(pid \d+\) was killed by SIGKILL") as e:
        launch.run_commands({0: SLEEP, 1: writer}, tmp_path, "fault", timeout_s=60, fault=fault)
    assert e.value.rank == 0 and "after the fault was injected" in str(e.value)
    assert e.value.stopped_s < launch.GRACE_S + 5


def test_the_children_of_a_process_are_stopped_with_it(tmp_path):
    """A worker's own children (torchrun's ranks, a data loader) share its session and go with it."""
    pid_file = tmp_path / "grandchild"
    parent = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(0.5); sys.exit(1)",
    ]
    with pytest.raises(launch.WorkerFailed):
        launch.run_commands({0: parent, 1: SLEEP}, tmp_path, "tree", timeout_s=60)
    assert _gone(int(pid_file.read_text()))


def test_every_process_gets_this_checkout_on_its_path_and_one_thread():
    env = launch.environment()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(launch.ROOT)
    assert env["OMP_NUM_THREADS"] == "1" and "intra_op_parallelism_threads=1" in env["XLA_FLAGS"]


def test_a_free_port_is_free():
    import socket

    port = launch.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_stop_all_ends_the_jobs_watched_in_other_threads(tmp_path):
    """What the suite calls when it is interrupted while jobs run beside each other."""
    import threading

    failures = []

    def job():
        try:
            launch.run_commands({0: SLEEP}, tmp_path, "other", timeout_s=60)
        except launch.WorkerFailed as e:
            failures.append(e)

    thread = threading.Thread(target=job)
    thread.start()
    deadline = time.monotonic() + 20
    while not launch._RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    launch.stop_all()
    thread.join(timeout=20)
    assert not thread.is_alive() and failures and failures[0].rank == 0


@pytest.mark.parametrize("job", ["jax", "torch"])
def test_a_relative_output_folder_reaches_the_workers_as_an_absolute_one(tmp_path, monkeypatch, job):
    """The workers run inside their folder: a relative --out (``compare.run --out results/x``)
    made them write into results/x/.../results/x/... and the suite found nothing there."""
    seen = {}
    monkeypatch.setattr(launch, "run_commands", lambda commands, out, *a, **k: seen.update(commands=commands, out=out))
    monkeypatch.chdir(tmp_path)
    if job == "jax":
        launch.jax_job("checks", 2, 1, "rel/jobs")
    else:
        launch.torchrun_job("checks", 2, "rel/jobs")
    for command in seen["commands"].values():
        assert command[command.index("--out") + 1] == str(tmp_path / "rel" / "jobs")
    assert seen["out"] == tmp_path / "rel" / "jobs"
