"""The spec suite: runs the spec tests (``@pytest.mark.spec``) against the installed torch,
jax and flax, and turns each outcome into a ``spec`` record.

A record is ``{"id", "framework", "ok", "detail"}``: ``id`` is the fact's stable dotted
name (the marker's argument, also the first column of SEMANTICS.md); ``framework`` is
``torch``, ``linen``, ``nnx`` or ``cross``; ``ok`` is True, False, or None when the fact
could not be checked here (a GPU-only fact on a CPU machine), with the reason in ``detail``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compare.records import SpecRecord

TESTS = Path(__file__).resolve().parents[2] / "tests"


def framework_of(item) -> str:
    """The marker's ``framework=``, else the test's ``fw``/``api`` parameter, else 'cross'."""
    marker = item.get_closest_marker("spec")
    if "framework" in marker.kwargs:
        return marker.kwargs["framework"]
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("fw") or params.get("api") or "cross"


def params_of(item) -> str | None:
    """The test's parameter set other than the framework (``rate=0.25``), or None."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    shown = {k: v for k, v in params.items() if k not in ("fw", "api")}
    return ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) or None


class _Collector:
    """A pytest plugin that records one spec record per (fact, framework, parameter set)."""

    def __init__(self, progress: Callable[[str, int], None] | None):
        self.progress = progress
        self.facts: dict[str, tuple[str, str, str | None]] = {}
        self.records: list[dict] = []

    def pytest_collection_modifyitems(self, items):
        for item in items:
            marker = item.get_closest_marker("spec")
            if marker is not None:
                self.facts[item.nodeid] = (marker.args[0], framework_of(item), params_of(item))

    def pytest_runtest_logreport(self, report):
        if report.nodeid not in self.facts:
            return
        if report.when == "call" or (report.when == "setup" and not report.passed):
            fact_id, framework, params = self.facts[report.nodeid]
            if report.skipped:
                ok, detail = (
                    None,
                    f"skipped: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr}",
                )
            elif report.passed:
                branch = dict(report.user_properties).get("branch")  # a version-dependent fact's rule
                ok, detail = True, report.nodeid + (f" [{branch}]" if branch else "")
            else:
                message = str(report.longrepr).strip().splitlines()
                ok, detail = False, f"{report.nodeid}: {message[-1] if message else 'failed'}"
            record = SpecRecord(id=fact_id, framework=framework, ok=ok, detail=detail, params=params)
            self.records.append(record.to_dict())
            if self.progress:
                self.progress(fact_id, len(self.facts))


def run(progress: Callable[[str, int], None] | None = None, extra_args: list[str] | None = None) -> list[dict]:
    """Run every spec test; returns the records. ``progress(fact_id, total)`` after each."""
    import pytest

    if not TESTS.is_dir():
        raise FileNotFoundError(
            f"the spec suite runs the tests in {TESTS}, which is missing: run it from a source checkout"
        )
    collector = _Collector(progress)
    # no terminal reporter: the caller prints the records (and draws a progress bar)
    args = [
        str(TESTS),
        "-m",
        "spec",
        "-p",
        "no:terminal",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        *(extra_args or []),
    ]
    code = pytest.main(args, plugins=[collector])
    if code not in (0, 1):  # 0: all passed, 1: some failed; anything else is a usage/collection error
        raise RuntimeError(f"pytest could not run the spec tests (exit code {code})")
    return collector.records
