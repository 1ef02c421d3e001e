"""``results.json`` read as untrusted input: for ``--resume`` and the reports.

The file is bounded (:data:`~compare.io.limits.MAX_JSON_BYTES`, then the JSON budgets of
:func:`compare.io.limits.parse_json`), then validated against the record schema of
``compare.records``: ``meta`` with its known fields typed, one list per suite, every
record an object with each field of its kind present and of its type, strings that print.
A file of a newer schema than this code reads is refused (not relabelled), and every
problem is reported at once, the first few by name and the rest counted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import stat
import types
import typing
from pathlib import Path
from typing import Any

from compare import records
from compare.io import limits

NUMBER_STRINGS = ("nan", "inf", "-inf")  # how results.write keeps non-finite floats
LISTS = records.KINDS
Scalar = str | int | float | bool | None
META = {
    "schema_version": int, "compare_version": str | None, "python": str | None, "device": str | None,
    "device_name": str | None, "cpu_model": str | None, "cpu_count": int | None, "platform": str | None,
    "git_commit": str | None, "git_dirty": bool | None, "torch_num_threads": int | None,
    "env": dict[str, str | None], "jax_config": dict[str, Scalar], "gpu": str | None, "gpu_memory_bytes": int | None,
    "cuda_version": str | None, "cudnn_version": int | None, "nvidia_driver": str | None, "date": str,
    "command": str, "suites_done": list[str], "running": str, "stopped": str, "resumed_from": str,
    "bench_settings": dict[str, Any], "train_summary": dict[str, Any],
    **{pkg: str | None for pkg in ("numpy", "torch", "jax", "jaxlib", "flax", "optax")},
}  # fmt: skip
BENCH_SETTINGS = {"skipped": dict[str, str], "groups": dict[str, str]}
FAMILY = {
    "k": int, "alpha": float, "level": float, "correction": str, "kind": str,
    "blocks": dict[str, dict[str, list[int]]], "shared_seeds": dict[str, list[int]], "max_excluded": float,
}  # fmt: skip
OLD_CLAIM = {"claim": str, "model": str, "holds": bool | None, "detail": str}  # 0.2's claims rows


class ResultsFileError(limits.InputError):
    """A results.json that cannot be read, does not fit the schema or is of a newer schema."""


def read(path: str | Path) -> dict[str, Any]:
    """The results object in ``path``, validated (see the module's docstring); raises
    :class:`ResultsFileError` naming the file, each field and its problem."""
    path = Path(path)
    try:
        f, size = limits.open_regular(path)
        with f:
            limits.check("MAX_JSON_BYTES", size, "bytes of results.json")
            data = limits.parse_json(limits.read_exactly(f, size), "the file")
    except limits.LimitError as e:
        raise ResultsFileError(f"{path}: cannot be read as results ({e})") from None
    except OSError as e:
        raise ResultsFileError(f"{path}: cannot read it ({e.strerror or e})") from None
    found = problems(data)
    if found:
        shown, more = limits.limit("MAX_ERRORS_SHOWN"), found.total - min(len(found), limits.limit("MAX_ERRORS_SHOWN"))
        head = "; ".join(found[:shown]) + (f"; ... and {more:,} more" if more else "")
        total = f"{found.total:,}{' or more' if found.stopped else ''}"
        raise ResultsFileError(f"{path}: does not fit the results schema: {total} problem(s): {head}")
    return data


def check_folder(folder: str | Path) -> None:
    """A folder to be written again (``--resume``): nothing at its top level may be a
    symbolic link, a device, a FIFO or a socket, since results, the report and the figures
    are written there."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                mode = entry.stat(follow_symlinks=False).st_mode
                if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                    raise ResultsFileError(
                        f"{Path(folder) / entry.name}: is {limits.kind_of(mode)} in a results folder that would be "
                        "written again; remove it (results, report and figures are written only as regular files)"
                    )
    except OSError as e:
        raise ResultsFileError(f"{folder}: cannot read it ({e.strerror or e})") from None


def problems(data: Any) -> Problems:
    """Every way ``data`` does not fit the schema, each naming the field (the first 100 kept)."""
    found = Problems()
    if not isinstance(data, dict):
        return found.add([f"the top level is {_what(data)}, expected an object with 'meta' and one list per suite"])
    meta = data.get("meta")
    if not isinstance(meta, dict):
        return found.add([f"meta: {'missing' if meta is None else 'is ' + _what(meta)}, expected an object"])
    version = meta.get("schema_version", 1)
    if type(version) is int and version > records.SCHEMA_VERSION:
        return found.add([
            f"meta.schema_version is {version}: written by a newer version of this project (this one reads "
            f"schemas 1 to {records.SCHEMA_VERSION}); update the project to read it"
        ])  # fmt: skip
    found.add(_fields(meta, META, "meta", required=()))
    if type(version) is int and version < 1:
        found.add([f"meta.schema_version: {version}, expected 1 to {records.SCHEMA_VERSION}"])
    found.add(_fields(meta.get("bench_settings", {}), BENCH_SETTINGS, "meta.bench_settings", required=()))
    found.add([f"meta: a string with control characters ({limits.printable(repr(s), 60)})" for s in _bad_text(meta)])
    summary = meta.get("train_summary") if isinstance(meta.get("train_summary"), dict) else {}
    claims = summary.get("claims", [])
    new = isinstance(claims, list) and any(isinstance(c, dict) and "verdict" in c for c in claims)
    lists = {
        "meta.train_summary.claims": (claims, (records.Claim,) if new else OLD_CLAIM),
        "meta.train_summary.framework_agreement": (summary.get("framework_agreement", []), (records.Agreement,)),
        "meta.train_summary.implementation_check": (summary.get("implementation_check", []), (records.ImplementationCheck,)),
        "meta.train_summary.facts": (summary.get("facts", []), (records.Fact,)),
    }  # fmt: skip
    if "family" in summary:  # a protocol run's family (0.3): every entry the report reads
        found.add(_fields(summary["family"], FAMILY, "meta.train_summary.family", required=tuple(FAMILY)))
    for key, value in data.items():
        if key == "meta":
            continue
        if key not in LISTS:
            found.add([f"{limits.printable(repr(key), 60)}: not a list of this schema (known: {', '.join(LISTS)})"])
        else:
            lists[key] = (value, LISTS[key])
    for key, (value, kinds) in lists.items():
        if not isinstance(value, list):
            found.add([f"{key}: is {_what(value)}, expected a list of records"])
            continue
        for i, r in enumerate(value):
            if found.total >= 10_000:  # enough to know the file is not results: stop counting
                found.stopped = True
                return found
            where = f"{key}[{i}]"
            if key == "equivalence" and _old_train_record(r, version):  # before schema 3 (results.upgrade moves it)
                found.add(_record(r, (records.TrainEquivalenceRecord,), where))
            else:
                found.add(_fields(r, kinds, where, kinds) if isinstance(kinds, dict) else _record(r, kinds, where))
    return found


def _old_train_record(record: Any, version: Any) -> bool:
    """A train-mode record in ``equivalence``, where schemas 1 and 2 kept them."""
    return type(version) is int and version < 3 and isinstance(record, dict) and record.get("mode") == "train"


class Problems(list):
    """The first problems (up to 100) as a list, and ``total``, how many there are: a file
    of a million bad records costs a count (which stops at 10,000), not a million messages."""

    total, stopped = 0, False

    def add(self, problems: list[str]) -> Problems:
        self.total += len(problems)
        self.extend(problems[: max(0, 100 - len(self))])
        return self


@functools.cache
def _schema(kind: type) -> tuple[dict[str, Any], tuple[str, ...]]:
    """({JSON field name: its annotation}, the required names) of a record kind."""
    hints = typing.get_type_hints(kind)
    return {f.metadata.get("json") or f.name: hints[f.name] for f in dataclasses.fields(kind)}, kind.field_names(
        required_only=True
    )


def _record(record: Any, kinds: tuple[type, ...], where: str) -> list[str]:
    """The problems of ``record`` against the kind it fits best."""
    best = None
    for kind in kinds:
        fields, required = _schema(kind)
        found = _fields(record, fields, where, required) + [
            f"{where}: a string with control characters ({limits.printable(repr(s), 60)})" for s in _bad_text(record)
        ]
        if best is None or len(found) < len(best):
            best = found
    return best or []


def _fields(value: Any, fields: dict[str, Any], where: str, required: tuple[str, ...] | dict) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: is {_what(value)}, expected an object"]
    found = [f"{where}: missing field {name!r}" for name in required if name not in value]
    for name, tp in fields.items():
        if name in value and not _fits(value[name], tp):
            found.append(f"{where}.{name}: expected {_type_name(tp)}, found {_what(value[name])}")
    return found


def _fits(value: Any, tp: Any) -> bool:
    """Whether a JSON value fits a field's annotation (floats also as 'nan' and 'inf')."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is None or tp is type(None):
        return value is None
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if tp is float:
        return type(value) in (int, float) or value in NUMBER_STRINGS
    if tp in (int, bool, str):
        return type(value) is tp
    if tp is list or origin is list:
        return type(value) is list and all(_fits(v, args[0]) for v in value) if args else type(value) is list
    if tp is dict or origin is dict:
        return type(value) is dict and (not args or all(_fits(v, args[1]) for v in value.values()))
    return False


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, dict):
        return f"a {origin.__name__} of {_type_name(args[-1])}" if args else f"a {origin.__name__}"
    names = {
        str: "a string",
        int: "an int",
        float: "a number",
        bool: "true or false",
        dict: "an object",
        list: "a list",
    }
    return names.get(tp, "any value")


def _what(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value)) or ("an int" if type(value) is int else "a number")


def _bad_text(value: Any) -> list[str]:
    return [s for s in limits.strings(value) if not limits.clean_text(s)][:1]
