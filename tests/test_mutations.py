"""The mutation table (scripts/mutations.py) and the spec stay in step: every entry attacks a
fact through the test SEMANTICS.md names for it, every row marked *(checked: ...)* has at
least one entry, and every test under a mutation says in its docstring what it catches.
(The mutations themselves run in CI: ``python scripts/mutate.py``.)"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from test_semantics_doc import _rows, _spec_tests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import mutations  # noqa: E402


def test_every_mutation_attacks_a_fact_through_the_test_of_its_row():
    rows, tests = _rows(), _spec_tests()
    wrong = {m.name: (m.fact, m.test) for m in mutations.MUTATIONS if rows.get(m.fact) != m.test or m.fact not in tests}
    assert wrong == {}, "mutations whose fact has no row or whose test is not the row's"


def test_every_row_checked_on_the_release_sets_has_a_mutation():
    checked = {
        m["id"]
        for line in (ROOT / "SEMANTICS.md").read_text().splitlines()
        if "*(checked:" in line and (m := re.match(r"^\| `(?P<id>[^`]+)` \|", line))
    }
    assert len(checked) >= 20
    assert sorted(checked - {m.fact for m in mutations.MUTATIONS}) == []


def test_every_mutated_test_lists_what_it_catches():
    docs = {}
    for path in sorted((ROOT / "tests").glob("test_spec_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                docs[f"tests/{path.name}::{node.name}"] = ast.get_docstring(node) or ""
    silent = sorted({m.test for m in mutations.MUTATIONS if "Catches:" not in docs.get(m.test, "")})
    assert silent == []


def test_a_mutation_is_caught_only_by_the_expected_failure_of_its_test():
    """The runner's verdict: a pass is a survivor; a failure of another kind (a crash in
    setup, a TypeError from a broken mutation) is an error, not a catch."""
    import mutate

    m = mutations.BY_NAME["nnx-state-copies"]

    def outcome(outcome, message="", when="call"):
        return {"mutant": m.name, "test": m.test, "when": when, "outcome": outcome, "message": message}

    assert mutate.verdict(m, [outcome("failed", "assert np.False_")])[0] == "caught"
    assert mutate.verdict(m, [outcome("failed", "AssertionError: \nNot equal")])[0] == "caught"
    assert mutate.verdict(m, [outcome("passed")])[0] == "SURVIVED"
    assert mutate.verdict(m, [])[0] == "ERROR"
    assert mutate.verdict(m, [outcome("failed", "TypeError: bad mutation")])[0] == "ERROR"
    assert mutate.verdict(m, [outcome("failed", "AssertionError", when="setup")])[0] == "ERROR"
