"""SEMANTICS.md and the spec tests cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(?P<id>[^`]+)` \|.*\| `(?P<test>tests/[\w/]+\.py::\w+)` \|$")


def _rows() -> dict[str, str]:
    rows = {}
    for line in (ROOT / "SEMANTICS.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            assert m["id"] not in rows, f"duplicate row for {m['id']}"
            rows[m["id"]] = m["test"]
    return rows


def _spec_tests() -> dict[str, str]:
    """spec id -> 'tests/file.py::test_name' for every @spec / @pytest.mark.spec test."""
    found = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for dec in node.decorator_list:
                func = dec.func if isinstance(dec, ast.Call) else None
                name = getattr(func, "id", None) or getattr(func, "attr", None)
                if name == "spec":
                    found[dec.args[0].value] = f"tests/{path.name}::{node.name}"
    return found


def test_every_spec_test_has_a_row_and_every_row_names_its_own_test():
    rows, tests = _rows(), _spec_tests()
    assert len(tests) >= 30
    assert sorted(set(tests) - set(rows)) == [], "spec tests without a row in SEMANTICS.md"
    assert sorted(set(rows) - set(tests)) == [], "rows in SEMANTICS.md without a spec test"
    wrong = {fact: (rows[fact], tests[fact]) for fact in rows if rows[fact] != tests[fact]}
    assert wrong == {}, "rows that name another test than the one carrying their id"
