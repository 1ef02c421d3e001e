"""results.json (``--resume`` and the reports) against hostile input: validated against the
record schema, every problem named with its field, a schema from the future refused, and
``python -m compare.run --resume`` answering a refused file with one line and exit status
2, changing nothing. Then a generator: any field of a valid results object replaced by a
structured hostile value; what the reader accepts, the report and the console render."""

from __future__ import annotations

import copy
import functools
import io
import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from compare import run
from compare.bench.suite import measured_groups
from compare.io import limits, results_file
from compare.io.results_file import ResultsFileError
from compare.records import SCHEMA_VERSION
from compare.report import console as console_report
from compare.report import markdown, results

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@functools.cache
def _base() -> dict:
    """Two records of every list of the committed results, and a meta of today's schema."""
    full = json.loads((ROOT / "results" / "cpu-2core-x86_64" / "results.json").read_text())
    small = {k: v[:2] for k, v in full.items() if k != "meta"}
    meta = dict(full["meta"], schema_version=SCHEMA_VERSION)
    meta["train_summary"] = {k: v[:2] if isinstance(v, list) else v for k, v in meta["train_summary"].items()}
    return results.upgrade({"meta": meta, **small})


def _folder(tmp_path: Path, text: str) -> Path:
    (tmp_path / "results.json").write_text(text)
    return tmp_path


def _resume(folder: Path, capsys) -> tuple[int, str]:
    def snapshot():
        return {
            p.name: p.read_bytes() if p.is_file() and not p.is_symlink() else p.lstat().st_mode
            for p in folder.iterdir()
        }

    before = snapshot()
    status = run.main(["--suite", "bench", "--sweep", "smoke-cpu", "--resume", str(folder)])
    err = capsys.readouterr().err
    assert snapshot() == before  # nothing written or changed
    return status, err


# --- one test per class ---------------------------------------------------------------------------

RESUME_CASES = {
    "malformed_json": ('{"meta": {', "is not valid JSON"),
    "a_list_at_top_level": ("[1, 2]", "the top level is a list"),
    "deep_nesting": ('{"meta": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}", "MAX_JSON_DEPTH"),
    "wrong_types": ('{"meta": {"suites_done": "bench"}, "bench": {}}', "meta.suites_done: expected a list"),
    "missing_keys": ('{"meta": {}, "bench": [{"model": "mlp"}]}', "bench[0]: missing field 'impl'"),
    "nan": ('{"meta": {"x": NaN}}', "NaN is not a JSON value"),
    "a_huge_list": ('{"meta": {}, "spec": [' + ",".join(["1"] * 2_500_000) + "]}", "MAX_JSON_VALUES"),
    "future_schema": (json.dumps({"meta": {"schema_version": SCHEMA_VERSION + 1}}), "written by a newer version"),
    "control_characters": ('{"meta": {"command": "\\u001b[32mok"}}', "control characters"),
    "unknown_list": ('{"meta": {}, "evil": []}', "'evil': not a list of this schema"),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_from_a_refused_results_file_is_one_line_exit_2_and_nothing_changes(tmp_path, case, capsys):
    text, fragment = RESUME_CASES[case]
    status, err = _resume(_folder(tmp_path, text), capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1, err[-2000:]
    assert "results.json" in err and fragment in err and "Traceback" not in err, err[-2000:]


def test_every_problem_is_named_with_its_field_the_first_ones_shown_and_the_rest_counted(tmp_path):
    bad = copy.deepcopy(_base())
    bad["bench"] = [{**bad["bench"][0], "step_ms_median": "fast"} for _ in range(50)]
    path = _folder(tmp_path, json.dumps(bad)) / "results.json"
    with pytest.raises(ResultsFileError) as e:
        results.load(path)
    text = str(e.value)
    assert "50 problem(s)" in text and "bench[0].step_ms_median: expected a number, found a string" in text
    assert f"... and {50 - limits.MAX_ERRORS_SHOWN} more" in text and str(path) in text


def test_a_future_schema_is_refused_not_relabelled(tmp_path):
    future = dict(_base(), meta={**_base()["meta"], "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ResultsFileError, match=f"schema_version is {SCHEMA_VERSION + 1}: written by a newer version"):
        results.load(_folder(tmp_path, json.dumps(future)) / "results.json")


def test_the_committed_results_and_a_fresh_one_fit_the_schema():
    for path in (ROOT / "results").rglob("results.json"):
        assert results_file.problems(json.loads(path.read_text())) == [], path
    assert results_file.problems(_base()) == []


def test_a_results_folder_with_a_link_or_a_fifo_is_not_resumed(tmp_path, capsys):
    import os

    folder = _folder(tmp_path, json.dumps(_base()))
    target = tmp_path.parent / f"{tmp_path.name}-outside.png"
    target.write_bytes(b"not yours")
    (folder / "bench_throughput.png").symlink_to(target)
    status, err = _resume(folder, capsys)
    assert status == 2 and "bench_throughput.png: is a link" in err and target.read_bytes() == b"not yours"
    (folder / "bench_throughput.png").unlink()
    os.mkfifo(folder / "report.md")
    status, err = _resume(folder, capsys)
    assert status == 2 and "report.md: is a FIFO" in err


# --- the generator -----------------------------------------------------------------------------------

hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["nan", "inf", "", "[/red]", "\x1b[2J", "\ud800", "9" * 5000, "holds", "@@"]),
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=8,
    ),
)


def _paths(obj, prefix=()):
    """Every path into ``obj`` (keys and indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@functools.cache
def _all_paths() -> list[tuple]:
    return [p for p in _paths(_base()) if p]


@functools.cache
def _fresh_meta() -> dict:
    return results.meta("cpu")


@FAST
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), hostile, st.sampled_from(["replace", "delete", "add"])), min_size=1, max_size=3
    ),
    literal=st.sampled_from(["", "NaN", "Infinity", "1e999"]),
)
def test_generated_results_files_render_or_are_refused_with_the_field_named(tmp_path_factory, edits, literal):
    data = copy.deepcopy(_base())
    paths = _all_paths()
    for pick, value, how in edits:
        path = paths[pick % len(paths)]
        parent = data
        try:
            for step in path[:-1]:
                parent = parent[step]
            if how == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif how == "add" and isinstance(parent, dict):
                parent[f"{path[-1]}_x"] = value
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    text = json.dumps(data, ensure_ascii=False).replace('"@@"', literal or '"@@"')
    folder = tmp_path_factory.mktemp("resume")
    (folder / "results.json").write_text(text, errors="surrogatepass")
    t0 = time.process_time()
    try:
        loaded = results.resumed(folder, _fresh_meta())
    except ResultsFileError as e:
        assert "results.json" in str(e) and str(e).isprintable(), str(e)
    else:  # what is accepted, the run and its reports use
        measured_groups(results.Results(folder, loaded))
        results.failures(loaded)
        markdown.render(loaded, None)
        console_report.show(loaded, Console(file=io.StringIO(), width=120))
    assert time.process_time() - t0 < 10


def test_rich_markup_in_a_results_file_prints_as_itself_in_the_console():
    """A name like ``[/red]`` is text: rich must not read it as markup (it raised MarkupError)."""
    data = _base()
    data["equivalence"][0] = {
        **data["equivalence"][0],
        "model": "[/red][bold]x",
        "ok": False,
        "first_divergence": "[/]",
    }
    out = io.StringIO()
    console_report.show(data, Console(file=out, width=200))
    assert "[/red][bold]x" in out.getvalue() and "first divergence at [/]" in out.getvalue()


@pytest.mark.parametrize(
    ("entry", "field", "value"),
    [("implementation_check", "mean_diff", "del"), ("facts", "claim", "del"), ("claims", "dataset", None),
     ("claims", "level", None), ("family", "k", "del")],
)  # fmt: skip
def test_the_claims_summary_of_0_3_is_validated_or_rendered(entry, field, value):
    """The summary's entries of 0.3 (family, implementation check, facts) are checked like
    the claims; an optional claim field that is null renders as if absent (each raised in
    the report before)."""
    data = copy.deepcopy(_base())
    summary = data["meta"]["train_summary"]
    target = summary[entry] if entry == "family" else summary[entry][0]
    if value == "del":
        del target[field]
        assert any(field in p for p in results_file.problems(data)), entry
    else:
        target[field] = value
        assert results_file.problems(data) == []
        markdown.render(results.upgrade(data), None)
        console_report.show(data, Console(file=io.StringIO(), width=120))
