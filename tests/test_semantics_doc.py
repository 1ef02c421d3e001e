"""SEMANTICS.md and the spec tests cannot drift apart."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(?P<id>[^`]+)` \|.*\| `(?P<test>tests/[\w/]+\.py::\w+)` \|$")


def _rows() -> dict[str, str]:
    """id -> test of every fact row; a table row that starts like a fact but does not parse
    is an error, not a silently skipped row."""
    rows = {}
    for line in (ROOT / "SEMANTICS.md").read_text().splitlines():
        m = ROW.match(line)
        if m:
            assert m["id"] not in rows, f"duplicate row for {m['id']}"
            rows[m["id"]] = m["test"]
        else:
            assert not line.startswith("| `"), f"a fact row that does not parse: {line[:120]}"
    return rows


def _spec_tests() -> dict[str, str]:
    """spec id -> 'tests/file.py::test_name' for every @spec / @pytest.mark.spec test."""
    found = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            for dec in node.decorator_list:
                func = dec.func if isinstance(dec, ast.Call) else None
                name = getattr(func, "id", None) or getattr(func, "attr", None)
                if name != "spec":
                    continue
                where = f"tests/{path.name}::{node.name}"
                assert isinstance(node, ast.FunctionDef), f"{where}: a spec marker on a class (one fact, one test)"
                fact = dec.args[0].value
                assert fact not in found, f"{fact} is marked on {found[fact]} and on {where}"
                found[fact] = where
    return found


def test_every_spec_test_has_a_row_and_every_row_names_its_own_test():
    rows, tests = _rows(), _spec_tests()
    assert len(tests) >= 30
    assert sorted(set(tests) - set(rows)) == [], "spec tests without a row in SEMANTICS.md"
    assert sorted(set(rows) - set(tests)) == [], "rows in SEMANTICS.md without a spec test"
    wrong = {fact: (rows[fact], tests[fact]) for fact in rows if rows[fact] != tests[fact]}
    assert wrong == {}, "rows that name another test than the one carrying their id"
