"""A rerun of the confirmatory command reproduces every per-seed effect exactly, on a toy
protocol: the command run once with two worker processes, then most of its units run
again by ``--resume`` in one worker, in new processes; every record and every per-seed
effect is bit-identical. The thread counts it fixed are recorded in ``meta``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "data" / "claims_toy_protocol.toml"


def _run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "compare.run", "--suite", "train", "--protocol", str(TOY), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _effects(results: dict) -> dict:
    return {
        (c["row"], c["dataset"], c.get("regime")): list(zip(c["per_seed_seeds"], c["per_seed_frameworks"], c["per_seed"], strict=True))
        for c in results["meta"]["train_summary"]["claims"]
    }  # fmt: skip


def _records(results: dict) -> dict:
    out = {}
    for r in results["train"]:
        key = (r["framework"], r["seed"], r["claim"], r["use_bn"], r["dropout"], r["lr"], r.get("variant"),
               r.get("label_noise"), json.dumps(r.get("search")))  # fmt: skip
        out[key] = {k: v for k, v in r.items() if k != "wall_s"}
    return out


def test_a_rerun_reproduces_every_per_seed_effect_and_every_record_exactly(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _run("--workers", "2", "--out", str(first))
    a = json.loads((first / "results.json").read_text())
    threads = a["meta"]["train_threads"]
    assert threads["torch_num_threads"] == 1 and threads["workers"] == 2
    assert threads["env"]["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    assert a["meta"]["train_protocol"]["sha256"] and a["meta"]["train_protocol"]["kind"] == "pilot"

    # the same run, its units but two forgotten, resumed in one worker: they are made again
    shutil.copytree(first, second)
    kept = a["meta"]["train_units_done"][:2]
    partial = json.loads((second / "results.json").read_text())
    keep = {tuple(k.split("/")) for k in kept}
    partial["train"] = [r for r in partial["train"] if (r["dataset"], r["framework"], str(r["seed"])) in keep]
    partial["meta"]["train_units_done"] = kept
    partial["meta"]["suites_done"] = []
    del partial["meta"]["train_summary"]
    (second / "results.json").write_text(json.dumps(partial))
    _run("--workers", "1", "--resume", str(second))
    b = json.loads((second / "results.json").read_text())
    assert b["meta"]["train_threads"]["workers"] == 1 and len(b["meta"]["train_units_done"]) == 6
    assert _effects(a) == _effects(b)
    assert _records(a) == _records(b)
