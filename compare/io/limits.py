"""The budgets of untrusted input: every file this project reads is checked against them
*before* the work they bound is done, and a file past one is refused with an error that
names the file, the budget, what the file declared, and how to raise the budget.

What is trusted and what is not (docs/files.md, "Threat model"): the installed packages,
the command line and the environment are trusted; every file read (weights, training
checkpoints, datasets, results.json) is not. Each reader parses its file once, with its own
code, and uses exactly what it checked; its memory is at most twice the file's bytes plus
:data:`MEMORY_SLACK_BYTES`, its work is linear in the file's bytes and bounded in steps.

Every budget is a constant of this module and can be raised (or lowered) for one process
with the environment variable ``BN_PARITY_<NAME>`` (an int: ``BN_PARITY_MAX_TENSORS=20000``).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import bnconfig

MiB, GiB = 1 << 20, 1 << 30
ENV_PREFIX = "BN_PARITY_"

# every reader
MEMORY_SLACK_BYTES = 256 * MiB  # memory budget of a read: twice the file's bytes plus this
MAX_ERRORS_SHOWN = 20  # problems listed in one error; the rest are counted

# safetensors and .pt weights
MAX_HEADER_BYTES = 16 * MiB  # a safetensors JSON header (resnet152 needs ~80 KB)
MAX_TENSORS = 10_000  # entries in one weights file
MAX_TENSOR_ELEMENTS = 1 << 31  # elements of one tensor
MAX_TOTAL_BYTES = 16 * GiB  # the data of one weights file
MAX_ARCHIVE_ENTRIES = 65_536  # entries of a .pt zip archive (one per storage)
MAX_PICKLE_BYTES = 64 * MiB  # the pickle of a .pt file (resnet152's is ~100 KB)
MAX_PICKLE_STEPS = 1_000_000  # opcodes of one pickle (resnet152's state_dict: ~30,000)
MAX_PICKLE_TENSORS = 50_000  # tensors one pickle may describe (state_dict and optimizer state)

# JSON: results.json, safetensors headers, header entries
MAX_JSON_BYTES = 64 * MiB  # one results.json (a full run writes a few MB)
MAX_JSON_VALUES = 2_000_000  # values of one JSON document, counted before parsing
MAX_JSON_DEPTH = 32  # nesting of one JSON document (results.json nests 4 deep)

# model configurations read from a file's header
MAX_STAGES = 8  # ResNet stages
MAX_BLOCKS = 48  # blocks in one ResNet stage (resnet152's deepest has 36; tracing 8 x 48 takes ~7 s)
MAX_HIDDEN_LAYERS = 64  # MLP hidden layers, CNN conv blocks
MAX_WIDTH = 1 << 16  # features or channels of one layer
MAX_CLASSES = 1 << 20
MAX_IMAGE_SIDE = 4096
MAX_SAMPLE_ELEMENTS = 1 << 26  # elements of one input sample (input_shape)

# datasets
MAX_DATASET_BYTES = 4 * GiB  # one decompressed IDX file or CIFAR batch
MAX_DATASET_PICKLE_STEPS = 1_000_000  # opcodes of one CIFAR batch (a real one: ~40,000)

BUDGETS = {
    "MEMORY_SLACK_BYTES": "memory a read may use beyond twice the file's bytes",
    "MAX_HEADER_BYTES": "bytes of a safetensors header",
    "MAX_TENSORS": "tensors in one weights file",
    "MAX_TENSOR_ELEMENTS": "elements of one tensor",
    "MAX_TOTAL_BYTES": "bytes of tensor data in one weights file",
    "MAX_ARCHIVE_ENTRIES": "entries of a .pt archive",
    "MAX_PICKLE_BYTES": "bytes of the pickle in a .pt file",
    "MAX_PICKLE_STEPS": "opcodes of one pickle",
    "MAX_PICKLE_TENSORS": "tensors one pickle describes",
    "MAX_JSON_BYTES": "bytes of a JSON file",
    "MAX_JSON_VALUES": "values of one JSON document",
    "MAX_JSON_DEPTH": "nesting depth of one JSON document",
    "MAX_DATASET_BYTES": "bytes of one dataset file, decompressed",
    "MAX_DATASET_PICKLE_STEPS": "opcodes of one CIFAR batch",
}  # the sizes of model configurations (MAX_STAGES, ...) are fixed: a real model never nears them


class InputError(ValueError):
    """An untrusted input refused: the message names the file and the problem. Every
    reader's own error (``CheckpointError``, ``DataError``, ``ResultsFileError``) is one."""


class LimitError(InputError):
    """An input past one of the budgets of this module, or malformed in a way checked here."""


class BudgetError(LimitError):
    """An input past one of the budgets: the message names it and how to raise it."""


def limit(name: str) -> int:
    """The budget ``name``: ``BN_PARITY_<name>`` from the environment when set, else the
    constant of this module."""
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None:
        return globals()[name]
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name}={raw!r}: expected an int") from None
    if value < 0:
        raise ValueError(f"{ENV_PREFIX}{name}={raw!r}: expected an int >= 0")
    return value


def over(name: str, found: int, what: str | None = None) -> str:
    """'<what>: <found>, more than the budget of <limit> (<name>; raise it with BN_PARITY_<name>)'."""
    return (
        f"{what or BUDGETS.get(name, name)}: {found:,}, more than the budget of {limit(name):,}"
        f" ({name}; raise it with the environment variable {ENV_PREFIX}{name})"
    )


def check(name: str, found: int, what: str | None = None) -> None:
    """Raises :class:`LimitError` when ``found`` is past the budget ``name``."""
    if found > limit(name):
        raise BudgetError(over(name, found, what))


def memory_budget(file_bytes: int) -> int:
    """The bytes a read of a ``file_bytes`` file may hold: twice that plus the slack."""
    return 2 * file_bytes + limit("MEMORY_SLACK_BYTES")


def printable(text: object, limit_chars: int = 300) -> str:
    """``text`` safe for a terminal: control characters (escape sequences, carriage returns,
    newlines, bidirectional overrides) written as escapes, cut at ``limit_chars``."""
    text = str(text)
    out = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:limit_chars])
    return out + ("..." if len(text) > limit_chars else "")


def summary(problems: list[str], shown: int | None = None) -> str:
    """The first problems joined with '; ', then how many more there are."""
    shown = limit("MAX_ERRORS_SHOWN") if shown is None else shown
    head = "; ".join(problems[:shown])
    return head + (f"; ... and {len(problems) - shown:,} more" if len(problems) > shown else "")


def clean_text(text: str) -> bool:
    """Whether ``text`` is printable (newlines and tabs allowed) and valid UTF-8 (no lone
    surrogates): what a name or a record string may be."""
    return all(c.isprintable() or c in "\n\t" for c in text) and not any("\ud800" <= c <= "\udfff" for c in text)


# --- files --------------------------------------------------------------------------------


def open_regular(path: Path) -> tuple[BinaryIO, int]:
    """``path`` opened for reading, with its size: a regular file (after following links),
    checked on the open descriptor, so that a FIFO or a device (which never ends, or never
    answers) is refused instead of read. Raises OSError or :class:`LimitError`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LimitError(f"not a regular file ({kind_of(info.st_mode)})")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f, info.st_size


def kind_of(mode: int) -> str:
    """What a file of ``st_mode`` is, in words ('a FIFO', 'a character device', ...)."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a link")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


def read_exactly(f: BinaryIO, n: int) -> bytes:
    """``n`` bytes from ``f`` (its size was checked), or :class:`LimitError` when it ends first."""
    data = f.read(n)
    if len(data) != n:
        raise LimitError(f"the file ended after {len(data)} of {n} bytes (did it change while being read?)")
    return data


# --- JSON ---------------------------------------------------------------------------------


def parse_json(raw: bytes | str, what: str = "JSON") -> Any:
    """One JSON document, bounded before it is parsed: at most :data:`MAX_JSON_VALUES`
    values (counted from its separators: an upper bound), nested at most
    :data:`MAX_JSON_DEPTH` deep; no duplicate keys, no NaN or Infinity (not JSON), every
    string valid UTF-8. Raises :class:`LimitError` naming ``what``."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{") + 1
    if values > limit("MAX_JSON_VALUES"):
        raise BudgetError(f"{what}: " + over("MAX_JSON_VALUES", values, "up to that many values"))
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise BudgetError(f"{what}: " + over("MAX_JSON_DEPTH", 1000, "nested deeper than that")) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LimitError(f"{what} is not valid JSON ({printable(e, 200)})") from None
    depth = json_depth(doc, limit("MAX_JSON_DEPTH"))
    if depth > limit("MAX_JSON_DEPTH"):
        raise BudgetError(f"{what}: " + over("MAX_JSON_DEPTH", depth, "nested that deep"))
    return doc


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen, dupes = set(), []
        for k, _ in pairs:
            if k in seen:
                dupes.append(k)
            seen.add(k)
        raise ValueError(f"duplicate key {printable(repr(dupes[0]), 80)}")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def json_depth(doc: Any, stop: int) -> int:
    """The nesting depth of a parsed JSON value (1 for a scalar), without recursion; stops
    counting past ``stop``."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        value, depth = todo.pop()
        deepest = max(deepest, depth)
        if deepest > stop:
            return deepest
        if isinstance(value, dict):
            todo.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            todo.extend((v, depth + 1) for v in value)
    return deepest


def strings(doc: Any) -> Iterable[str]:
    """Every key and string of a parsed JSON value, without recursion."""
    todo = [doc]
    while todo:
        value = todo.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            yield from value.keys()
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)


def tensor_problems(name: Any, tensor: Any) -> list[str]:
    """What makes a loaded torch value unfit as a weight: a non-string key, not a tensor,
    sparse/quantized/meta/float8/complex tensors, and views larger than their storage
    (a stride-0 view would allocate its full size when copied)."""
    import torch

    if not isinstance(name, str):
        return [f"key {name!r} is a {type(name).__name__}, expected a string"]
    if not isinstance(tensor, torch.Tensor):
        return [f"{name!r} is a {type(tensor).__name__}, expected a tensor"]
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        return [f"{name!r}: a {tensor.layout} {'quantized ' if tensor.is_quantized else ''}tensor on {tensor.device}"]
    allowed = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8}
    if tensor.dtype not in allowed:
        return [f"{name!r}: dtype {tensor.dtype} is not a weight dtype"]
    if tensor.numel() > limit("MAX_TENSOR_ELEMENTS"):
        return [f"{name!r}: " + over("MAX_TENSOR_ELEMENTS", tensor.numel())]
    storage_elements = tensor.untyped_storage().nbytes() // max(tensor.element_size(), 1)
    if tensor.numel() > storage_elements:
        return [f"{name!r}: a view of {tensor.numel()} elements over a storage of {storage_elements}"]
    return []


CAPS = bnconfig.Caps(
    width=MAX_WIDTH,
    blocks=MAX_BLOCKS,
    stages=MAX_STAGES,
    hidden_layers=MAX_HIDDEN_LAYERS,
    image_side=MAX_IMAGE_SIDE,
    sample_elements=MAX_SAMPLE_ELEMENTS,
    classes=MAX_CLASSES,
)


def config_problems(kind: str, fields: Mapping[str, Any], input_shape: Any) -> list[str]:
    """The sizes of a model configuration read from a file, checked before the config or
    any model is built (a 276-byte header must not describe a 30,000-block ResNet). Each
    kind says which of its fields are sizes (``bnconfig``'s ``size_problems``)."""
    problems = []
    if not (isinstance(input_shape, list) and 1 <= len(input_shape) <= 3):
        problems.append(f"input_shape = {input_shape!r}: expected a list of 1 to 3 ints")
    elif not all(type(v) is int and 1 <= v <= MAX_SAMPLE_ELEMENTS for v in input_shape):
        problems.append(f"input_shape = {input_shape!r}: expected ints in [1, {MAX_SAMPLE_ELEMENTS}]")
    elif math.prod(input_shape) > MAX_SAMPLE_ELEMENTS:
        problems.append(f"input_shape = {input_shape}: more than {MAX_SAMPLE_ELEMENTS} elements per sample")
    if kind not in bnconfig.KINDS:
        return [*problems, f"config_type {kind!r}: known kinds are {', '.join(bnconfig.KINDS)}"]
    return problems + bnconfig.KINDS[kind].size_problems(fields, CAPS)
