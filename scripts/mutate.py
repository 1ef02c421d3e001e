"""Every spec test listed in scripts/mutations.py must fail under its mutation.

    python scripts/mutate.py [--jobs N] [--list] [NAME ...]

For each mutation (all, or the NAMEs given) it runs the fact's test in a fresh pytest
process with the mutation applied as a monkeypatch (``-p mutations``, ``SPEC_MUTANT=NAME``;
no file is changed) and expects the test to fail with the kind of error the entry names (an
assertion, a ``pytest.raises`` that did not raise, ...). It prints one line per mutation
and exits non-zero when a mutation survives (the test passed), was never applied, or broke
the test some other way (an error that is not the fact's). Run it from any directory; it
uses the Python it is started with.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from mutations import BY_NAME, MUTATIONS, Mutation  # noqa: E402


def run_one(mutation: Mutation) -> tuple[str, str, float]:
    """(verdict, detail, seconds): verdict is 'caught', 'SURVIVED' or 'ERROR'."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {
            **os.environ,
            "SPEC_MUTANT": mutation.name,
            "SPEC_MUTANT_REPORT": str(report),
            # one torch thread per process: --jobs processes share the cores without spinning
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "scripts"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        }
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mutations", "-o", "addopts="]
        if mutation.select:
            cmd += ["-k", mutation.select]
        proc = subprocess.run([*cmd, mutation.test], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if not report.exists():
            return (
                "ERROR",
                f"pytest exited {proc.returncode} without a report:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}",
                seconds,
            )
        result = json.loads(report.read_text())
    if not result["applied"]:
        return "ERROR", f"the mutation was never applied (pytest exit {proc.returncode}: no test ran?)", seconds
    if proc.returncode == 0:
        return "SURVIVED", f"{len(result['applied'])} test(s) passed with the mutation", seconds
    failures = result["failures"]
    wrong = [f for f in failures if f["when"] != "call" or not re.search(mutation.expect, f["message"])]
    if proc.returncode != 1 or not failures or wrong:
        shown = "; ".join(f"{f['test']} ({f['when']}): {f['message'][:200]}" for f in (wrong or failures)[:3])
        return (
            "ERROR",
            f"pytest exit {proc.returncode}, failures not of the expected kind /{mutation.expect}/: {shown}",
            seconds,
        )
    return (
        "caught",
        f"{len(failures)}/{len(result['applied'])} failed: {failures[0]['message'].splitlines()[0][:100]}",
        seconds,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="pytest processes at once (default 2)")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BY_NAME))
    if unknown:
        parser.error(f"unknown mutations {unknown}; known: {sorted(BY_NAME)}")
    chosen = [BY_NAME[n] for n in args.names] if args.names else MUTATIONS
    if args.list:
        for m in chosen:
            print(f"{m.name:40} {m.fact}\n{'':40} {m.what}\n{'':40} {m.test}")
        return 0
    started = time.perf_counter()
    bad = 0
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for m, (verdict, detail, seconds) in zip(chosen, pool.map(run_one, chosen), strict=True):
            bad += verdict != "caught"
            print(f"{verdict:8} {m.name:40} {seconds:5.1f} s  {m.fact}: {detail}", flush=True)
    total = time.perf_counter() - started
    print(f"mutate: {len(chosen) - bad} of {len(chosen)} mutations caught in {total:.0f} s ({args.jobs} at once)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
