"""Every spec test listed in scripts/mutations.py must fail under its mutation.

    python scripts/mutate.py [--jobs N] [--isolated] [--list] [NAME ...]

It runs pytest on the facts' tests with this module as a plugin (``-p mutate``). The plugin
parametrizes each attacked test function once per mutation of it (``[...-mutant=NAME]``),
applies the mutation with the test's ``monkeypatch`` (undone after it; no file is edited)
and writes every outcome to a report. A mutation is *caught* when its test fails with the
kind of error its entry expects (an assertion, a ``pytest.raises`` that did not raise, ...);
it *survived* when the test passed, and it is an *error* when it never ran or broke the
test some other way. The exit status is non-zero unless every mutation is caught.

The mutations are split over ``--jobs`` pytest processes (default 2, one per core here);
``--isolated`` gives every mutation a fresh process of its own (slower: each process
imports torch and jax again). Run it from any directory, with the Python to test.
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

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from mutations import BY_NAME, MUTATIONS, Mutation  # noqa: E402

# --- the pytest plugin (active when SPEC_MUTANTS names mutations) --------------------------

_outcomes: list[dict] = []
_mutant_of: dict[str, str] = {}  # node id -> the mutation it runs under


def _chosen() -> list[Mutation]:
    return [BY_NAME[n] for n in os.environ.get("SPEC_MUTANTS", "").split(",") if n]


def pytest_generate_tests(metafunc):
    names = [m.name for m in _chosen() if m.test == metafunc.definition.nodeid]
    if names:
        metafunc.parametrize("spec_mutant", names, ids=[f"mutant={n}" for n in names])


def pytest_collection_modifyitems(config, items):
    """Only the attacked parameter sets run: those with a mutant, and its ``select``."""
    keep, drop = [], []
    for item in items:
        name = getattr(getattr(item, "callspec", None), "params", {}).get("spec_mutant")
        selected = name and (BY_NAME[name].select is None or BY_NAME[name].select in item.name)
        (keep if selected else drop).append(item)
        if selected:
            _mutant_of[item.nodeid] = name
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def spec_mutant(request):
    return getattr(request, "param", None)


@pytest.fixture(autouse=True)
def _apply_spec_mutant(spec_mutant, monkeypatch):
    if spec_mutant:
        BY_NAME[spec_mutant].apply(monkeypatch)


def pytest_runtest_logreport(report):
    name = _mutant_of.get(report.nodeid)
    if name and (report.when == "call" or report.failed):
        crash = getattr(report.longrepr, "reprcrash", None)
        message = (crash.message if crash else str(report.longrepr)) if report.failed else ""
        _outcomes.append(
            {"mutant": name, "test": report.nodeid, "when": report.when, "outcome": report.outcome, "message": message}
        )


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("SPEC_MUTANT_REPORT")
    if path:
        Path(path).write_text(json.dumps(_outcomes))


# --- the runner -----------------------------------------------------------------------------


def verdict(mutation: Mutation, outcomes: list[dict]) -> tuple[str, str]:
    """('caught' | 'SURVIVED' | 'ERROR', detail) from the outcomes of the mutation's tests."""
    if not outcomes:
        return "ERROR", "never ran (no test matched its test id and select)"
    failed = [o for o in outcomes if o["outcome"] == "failed"]
    if not failed:
        return "SURVIVED", f"{len(outcomes)} test(s) passed with the mutation"
    wrong = [o for o in failed if o["when"] != "call" or not re.search(mutation.expect, o["message"])]
    if wrong:
        o = wrong[0]
        return (
            "ERROR",
            f"failed, not as expected (/{mutation.expect}/): {o['test']} ({o['when']}): {o['message'][:300]}",
        )
    return "caught", f"{len(failed)}/{len(outcomes)} failed: {failed[0]['message'].splitlines()[0][:100]}"


def run_group(group: list[Mutation]) -> tuple[dict[str, list[dict]], str, float]:
    """Run one pytest process over ``group``: (outcomes by mutation, its output, seconds)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {
            **os.environ,
            "SPEC_MUTANTS": ",".join(m.name for m in group),
            "SPEC_MUTANT_REPORT": str(report),
            # one torch thread per process: --jobs processes share the cores without spinning
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"), os.environ.get("PYTHONPATH")])),
        }
        tests = sorted({m.test for m in group})
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mutate", "-o", "addopts=", *tests]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        outcomes = json.loads(report.read_text()) if report.exists() else []
    by_mutant: dict[str, list[dict]] = {m.name: [] for m in group}
    for o in outcomes:
        by_mutant[o["mutant"]].append(o)
    return by_mutant, proc.stdout[-3000:] + proc.stderr[-3000:], time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="pytest processes at once (default 2)")
    parser.add_argument("--isolated", action="store_true", help="one fresh pytest process per mutation")
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
    jobs = max(1, args.jobs)
    groups = [[m] for m in chosen] if args.isolated else [chosen[i::jobs] for i in range(jobs) if chosen[i::jobs]]
    started = time.perf_counter()
    outcomes: dict[str, list[dict]] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for by_mutant, output, seconds in pool.map(run_group, groups):
            outcomes.update(by_mutant)
            if not any(by_mutant.values()):
                print(f"mutate: a pytest process ran nothing ({seconds:.0f} s):\n{output}")
    bad = 0
    for m in chosen:
        result, detail = verdict(m, outcomes[m.name])
        bad += result != "caught"
        print(f"{result:8} {m.name:38} {m.fact}: {detail}")
    total = time.perf_counter() - started
    print(f"mutate: {len(chosen) - bad} of {len(chosen)} mutations caught in {total:.0f} s ({len(groups)} processes)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
