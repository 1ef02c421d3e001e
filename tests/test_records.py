"""The records of results.json: one dataclass per kind, the same fields as before the 0.2
layout, and the same fields in docs/cli.md and DESIGN.md as in the code."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest

from compare import records
from compare.records import KINDS

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT.parent / "shared" / "DESIGN.md"  # beside the checkout in this project's CI


def _fields(suite: str, required_only: bool = False) -> list[set[str]]:
    return [set(kind.field_names(required_only=required_only)) for kind in KINDS[suite]]


def test_each_suite_has_its_record_kinds_and_each_field_is_declared_once():
    assert set(KINDS) == {
        "equivalence", "train_equivalence", "spec", "bench", "train", "distributed", "distributed_collectives",
        "distributed_comm_model", "distributed_steps",
    }  # fmt: skip
    for kinds in KINDS.values():
        for kind in kinds:
            names = kind.field_names()
            assert len(names) == len(set(names)), kind.__name__
            assert all(re.fullmatch(r"[a-z0-9_]+(-[0-9]+)?", n) for n in names), names  # snake_case (1e-4 allowed)


BEFORE_0_2 = json.loads((ROOT / "tests" / "data" / "fields_before_0.2.json").read_text())["suites"]


@pytest.mark.parametrize("suite", sorted(BEFORE_0_2))
def test_the_records_of_every_suite_keep_the_fields_they_had_before_the_move(suite):
    """Every record of the committed pre-0.2 run (``--suite all``) fits one record kind
    exactly: its required fields are all there and nothing else is. (Its train-mode
    equivalence records have their own list since schema 3.)"""
    suites = [suite, "train_equivalence"] if suite == "equivalence" else [suite]
    kinds = [(k, set(k.field_names(required_only=True)), set(k.field_names())) for s in suites for k in KINDS[s]]
    for keys in map(set, BEFORE_0_2[suite]):
        fits = [k.__name__ for k, required, everything in kinds if required <= keys <= everything]
        assert fits, f"{suite}: no record kind has exactly the fields {sorted(keys)}"


def test_a_results_file_of_schema_2_is_upgraded_on_load(tmp_path):
    """Its train-mode records move from ``equivalence`` to ``train_equivalence``."""
    from compare.report.results import load

    committed = json.loads((ROOT / "results" / "cpu-2core-x86_64" / "results.json").read_text())
    every = committed["equivalence"] + committed.get("train_equivalence", [])  # real records of both modes
    eval_record = next(r for r in every if r["mode"] == "eval")
    train_record = next(r for r in every if r["mode"] == "train")
    old = {"meta": {"schema_version": 2}, "equivalence": [eval_record, train_record]}
    (tmp_path / "results.json").write_text(json.dumps(old))
    new = load(tmp_path / "results.json")
    assert new["equivalence"] == [eval_record] and new["train_equivalence"] == [train_record]


def test_optional_fields_are_left_out_only_when_none():
    r = records.DistributedRecord(
        framework="torch", devices=2, bn_mode="sync", check="c", max_abs_diff=None, tol=None, ok=None
    )
    assert "detail" not in r.to_dict() and r.to_dict()["max_abs_diff"] is None
    assert r.__class__(**{**r.__dict__, "detail": "why"}).to_dict()["detail"] == "why"


def test_a_json_name_that_is_not_an_identifier_is_written_under_that_name():
    assert "trajectory_float32_first_step_above_1e-4" in records.TrainEquivalenceRecord.field_names()


def test_a_record_refuses_an_unknown_field():
    with pytest.raises(TypeError, match="unexpected keyword argument 'speed'"):
        records.SpecRecord(id="x", framework="torch", ok=True, detail="", speed=1)


def _readme_fields() -> dict[str, set[str]]:
    """docs/cli.md's results.json table: record class -> the backticked field names."""
    text = (ROOT / "docs" / "cli.md").read_text()
    rows = re.findall(r"^\s*\| `(\w+)` \| `(\w+)`[^|]*\| (.+) \|$", text, flags=re.M)
    out = {}
    for _suite, kind, cells in rows:
        # names are the backticked words before a ' (' or ',' : skip the value lists in parentheses
        cells = re.sub(r"\([^()]*\)", "", cells)
        out[kind] = set(re.findall(r"`([\w-]+)`", cells))
    return out


def test_the_cli_page_lists_exactly_the_fields_of_every_record_kind():
    table = _readme_fields()
    for kinds in KINDS.values():
        for kind in kinds:
            assert table.get(kind.__name__) == set(kind.field_names()), kind.__name__


def test_the_cli_page_lists_exactly_the_fields_of_a_claim():
    assert _readme_fields()["Claim"] == set(records.Claim.field_names())


def test_design_md_names_only_fields_that_the_records_have():
    """DESIGN.md's list of fields for equivalence, spec and bench (the shared design doc
    lies beside the checkout in CI; a user's checkout has none)."""
    if not DESIGN.exists():
        pytest.skip(f"{DESIGN} is not beside this checkout")
    text = DESIGN.read_text()
    checked = 0
    for suite in ("equivalence", "spec", "bench"):
        match = re.search(rf"  - `{suite}`: (.+?)(?=\n  - `|\n- )", text, flags=re.S)
        assert match, suite
        named = set(re.findall(r"`([a-z][\w-]*)`", re.sub(r"\([^()]*\)", "", match.group(1))))
        common = set.intersection(*_fields(suite, required_only=True))
        assert named <= common, f"{suite}: DESIGN.md names {sorted(named - common)} that no record has"
        checked += len(named)
    assert checked >= 25


def test_old_module_paths_still_import_with_a_deprecation_warning():
    import importlib
    import sys

    for old in ("compare.checkpoint", "compare.train_equivalence", "compare.training"):
        sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = importlib.import_module("compare.checkpoint")
        from compare import train_equivalence, training
    from compare.checks import train_equivalence as new_train_equivalence
    from compare.experiments import claims
    from compare.io import checkpoint as new_checkpoint

    assert checkpoint.read_flax is new_checkpoint.read_flax
    assert train_equivalence.one_step is new_train_equivalence.one_step
    assert training.claims is claims.claims and training.run is not None  # one old module, two new ones
    moved = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any("compare.checkpoint moved to compare.io.checkpoint" in m for m in moved), moved
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        _ = checkpoint.nope
