"""A run keeps what it measured: results are saved after every benchmark group, a SIGTERM
leaves them (and says what was not reached), ``--budget-s`` starts no group it cannot
finish, and ``--resume`` runs no group twice. The sweep is ``smoke-cpu``: three tiny mlp
groups of two implementations, a few seconds each."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from compare import run

GROUPS = ["mlp/b8/float32", "mlp/b16/float32", "mlp/b32/float32"]
ROOT = Path(__file__).resolve().parents[1]


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _groups_measured(results: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results.get("bench", []):
        key = f"{r['model']}/b{r['batch_size']}/{r['dtype']}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_sigterm_after_the_first_group_leaves_that_group_and_lists_the_rest(tmp_path):
    cmd = [sys.executable, "-m", "compare.run", "--suite", "bench", "--sweep", "smoke-cpu", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (tmp_path / "results.json").exists() and _groups_measured(_results(tmp_path)):
            break
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be stopped: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, proc.stderr.read().decode()[-3000:]
    results = _results(tmp_path)
    assert _groups_measured(results) == {GROUPS[0]: 2}
    assert results["meta"]["stopped"] == "SIGTERM during bench"
    states = results["meta"]["bench_settings"]["groups"]
    assert states[GROUPS[0]].startswith("done") and states[GROUPS[2]] == "not reached"
    assert "Stopped early" in (tmp_path / "report.md").read_text()
    # resumed to the end, the run is no longer marked as stopped
    assert run.main(["--suite", "bench", "--sweep", "smoke-cpu", "--resume", str(tmp_path)]) == 0
    results = _results(tmp_path)
    assert "stopped" not in results["meta"] and _groups_measured(results) == dict.fromkeys(GROUPS, 2)


def test_a_small_budget_skips_the_groups_it_cannot_finish_and_says_why(tmp_path):
    """The first group always runs (nothing is measured yet); its time predicts the others."""
    code = run.main(["--suite", "bench", "--sweep", "smoke-cpu", "--budget-s", "0.5", "--out", str(tmp_path)])
    assert code == 0
    results = _results(tmp_path)
    assert _groups_measured(results) == {GROUPS[0]: 2}
    states = results["meta"]["bench_settings"]["groups"]
    assert all(states[g].startswith("skipped: over the budget (expected ") for g in GROUPS[1:]), states
    assert "bench" not in results["meta"].get("suites_done", [])  # cut short: --resume finishes it
    assert "over the budget" in (tmp_path / "report.md").read_text()


def test_resume_runs_only_the_groups_that_are_missing(tmp_path):
    assert run.main(["--suite", "bench", "--sweep", "smoke-cpu", "--budget-s", "0.5", "--out", str(tmp_path)]) == 0
    first = _results(tmp_path)["bench"][0]
    assert run.main(["--suite", "bench", "--sweep", "smoke-cpu", "--resume", str(tmp_path)]) == 0
    results = _results(tmp_path)
    assert _groups_measured(results) == dict.fromkeys(GROUPS, 2)  # each group once, none twice
    assert results["bench"][0] == first  # the resumed records are kept as they were
    assert results["meta"]["bench_settings"]["groups"][GROUPS[0]] == "done (in the resumed results)"
    assert results["meta"]["resumed_from"] == str(tmp_path) and results["meta"]["suites_done"] == ["bench"]
    # a third run finds the suite complete and runs nothing
    assert run.main(["--suite", "bench", "--sweep", "smoke-cpu", "--resume", str(tmp_path)]) == 0
    assert _groups_measured(_results(tmp_path)) == dict.fromkeys(GROUPS, 2)
