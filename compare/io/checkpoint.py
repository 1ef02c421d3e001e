"""Weight files that cannot run code, written atomically, read with clear errors.

* Flax side: one ``.safetensors`` file holding the flat Flax arrays
  (``params/fc1/kernel``, ``batch_stats/bn1/mean``, ...) and, in its JSON header
  metadata, the model name and configuration, so that the file alone rebuilds the model.
* torch side: ``.safetensors`` (a state_dict) is preferred; ``.pt``/``.pth`` files of
  ``torch.save`` (zip or legacy) are read by this project's own parser and unpickler
  (``compare.io.pickles``), which builds tensors and plain containers only, never calls
  anything else, and checks every declared size against the bytes the file holds.
* Safetensors, not orbax: a single file, no code on load, readable by torch and numpy
  alike, and the same format on both sides of a conversion. It is read and written by
  ``compare.io.files``: one parse, the same one that is checked.
* Writes are atomic and go only where they should (``compare.io.files.atomic_path``).
* Every file is untrusted: its header and declared sizes are checked against the budgets
  of ``compare.io.limits`` before anything is allocated, and every malformed input raises a
  :class:`CheckpointError` that names the file and the problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from compare import transfer
from compare.io import files, limits, pickles
from compare.io.files import STALE_TMP_SECONDS, WriteError, atomic_path  # noqa: F401  (their home until 0.3)
from compare.registry import ModelSpec, get

FORMAT = "bn-dropout-parity/flax-weights/1"
TORCH_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8}  # fmt: skip  # the weight dtypes


class CheckpointError(limits.InputError):
    """A checkpoint file that is missing, unreadable or not what was asked for."""


@contextlib.contextmanager
def opened(path: str | Path, what: str) -> Iterator[tuple[BinaryIO, int]]:
    """(the open file, its size) of a non-empty regular file; every failure to read it, and
    every :class:`~compare.io.limits.LimitError` raised inside, a :class:`CheckpointError`
    naming ``path``: 'refused: ...' for a budget or a refusal, else 'not <what> (...)'."""
    path = Path(path)
    try:
        f, size = limits.open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except limits.LimitError as e:
        kind = "is a directory, expected a checkpoint file" if "directory" in str(e) else f"refused: {e}"
        raise CheckpointError(f"{path}: {kind}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    with f:
        if size == 0:
            raise CheckpointError(f"{path}: empty file")
        try:
            yield f, size
        except (limits.BudgetError, pickles.Refused) as e:
            raise CheckpointError(f"{path}: refused: {e}") from None
        except limits.LimitError as e:
            raise CheckpointError(f"{path}: not {what} ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None


# --- torch state_dicts ----------------------------------------------------------------------


def read_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torch state_dict from ``.safetensors``, or from a ``torch.save`` file (``.pt``,
    ``.pth``, zip or legacy). A full checkpoint dict with a ``state_dict`` or ``model``
    entry is unwrapped. Every tensor is checked (a string name that prints, a weight dtype,
    its bytes in the file) before any is built."""
    path = Path(path)
    if path.suffix == ".safetensors":
        with opened(path, "a valid safetensors file") as (f, size):
            stored, _ = files.read_header(f, size)
            bad = [f"{limits.printable(repr(k), 80)}: dtype {s.dtype} is not a weight dtype"
                   for k, s in stored.items() if s.dtype not in TORCH_DTYPES]  # fmt: skip
            if bad:
                raise CheckpointError(f"{path}: not a state_dict of weights: " + limits.summary(bad))
            return {k: _torch_tensor(files.read_bytes(f, s), s) for k, s in stored.items()}
    with opened(path, "a readable torch checkpoint") as (f, size):
        obj, build = read_pt(f, size)
        refs = _state_dict_refs(path, obj, size)
        return {k: build(ref) for k, ref in refs.items()}


def _torch_tensor(buf: bytearray, s: files.Stored) -> torch.Tensor:
    dtype = TORCH_DTYPES[s.dtype]
    if not buf:
        return torch.empty(s.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(s.shape)


def _state_dict_refs(path: Path, obj: Any, size: int) -> dict[str, pickles.TensorRef]:
    """The state_dict in what a ``.pt`` pickle built, every entry checked: a string key
    that prints, a tensor of a weight dtype; all of them within the memory budget."""
    for key in ("state_dict", "model", "model_state_dict"):
        if type(obj) is dict and key in obj and type(obj[key]) is dict:
            obj = obj[key]
    if type(obj) is not dict:
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors), got a {_kind(obj)}")
    limits.check("MAX_TENSORS", len(obj), "entries in the state_dict")
    problems = []
    for k, v in obj.items():
        name = limits.printable(repr(k), 80)
        if type(k) is not str:
            problems.append(f"key {name} is a {type(k).__name__}, expected a string")
        elif not limits.clean_text(k):
            problems.append(f"key {name} holds control characters")
        elif not isinstance(v, pickles.TensorRef):
            problems.append(f"{name} is a {_kind(v)}, expected a tensor")
        elif v.dtype not in pickles.WEIGHT_DTYPES:
            problems.append(f"{name}: dtype {v.dtype} is not a weight dtype")
        elif v.numel > limits.limit("MAX_TENSOR_ELEMENTS"):
            problems.append(f"{name}: " + limits.over("MAX_TENSOR_ELEMENTS", v.numel))
    if problems:
        raise CheckpointError(f"{path}: not a state_dict of dense tensors: " + limits.summary(problems))
    total = sum(v.nbytes for v in obj.values())
    if total > limits.memory_budget(size):
        raise CheckpointError(
            f"{path}: refused: its tensors total {total:,} bytes, more than twice the file's {size:,} bytes plus "
            f"{limits.limit('MEMORY_SLACK_BYTES'):,} (views that share storage; MEMORY_SLACK_BYTES, raise it with "
            f"the environment variable {limits.ENV_PREFIX}MEMORY_SLACK_BYTES)"
        )
    return obj


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return limits.printable(text.splitlines()[0], 200) if text else type(e).__name__


def _kind(value: Any) -> str:
    names = {pickles.TensorRef: "tensor", pickles.StorageRef: "storage", torch.dtype: "dtype"}
    return names.get(type(value), type(value).__name__)


def write_torch_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, *, not_same_as: Iterable[str | Path] = ()
) -> None:
    """A state_dict as ``.safetensors`` (or ``.pt`` with ``torch.save``), atomically;
    ``not_same_as``: sources the destination must not be."""
    path = Path(path)
    with atomic_path(path, not_same_as=not_same_as) as tmp, open(tmp, "wb") as f:
        if path.suffix == ".safetensors":
            files.write(f, state_dict)
        else:
            torch.save({k: v.detach().contiguous() for k, v in state_dict.items()}, f)


# --- torch.save files ------------------------------------------------------------------------


def read_pt(f: BinaryIO, size: int) -> tuple[Any, Any]:
    """(the unpickled object with :class:`~compare.io.pickles.TensorRef` for tensors, a function that builds
    the tensor of a ref) of a ``torch.save`` file. Nothing of the tensors' size is read
    until that function is called."""
    f.seek(0)
    if f.read(4) == b"PK\x03\x04":
        return _read_zip(f, size)
    return _read_legacy(f, size)


def _read_zip(f: BinaryIO, size: int) -> tuple[Any, Any]:
    entries = files.zip_entries(f, size)
    pkl = [n for n in entries if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pkl) != 1:
        raise limits.LimitError("the archive does not hold one <name>/data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    if any(not n.startswith(prefix) for n in entries):
        raise limits.LimitError("the archive's entries are not all in one folder")
    if prefix + "byteorder" in entries and _entry_bytes(f, entries[prefix + "byteorder"]) != b"little":
        raise limits.LimitError("written on a big-endian machine: only little-endian files are read")
    limits.check("MAX_PICKLE_BYTES", entries[pkl[0]].size, "bytes of data.pkl")

    def storage(ref: pickles.StorageRef) -> None:
        entry = entries.get(f"{prefix}data/{ref.key}")
        if entry is None or entry.size != ref.nbytes:
            found = "no entry" if entry is None else f"{entry.size:,} bytes"
            raise pickles.Refused(
                f"storage {ref.key}: the pickle declares {ref.nbytes:,} bytes, the archive holds {found}"
            )

    data = _entry_bytes(f, entries[pkl[0]])
    obj = pickles.unpickle(pickles.TorchUnpickler(io.BytesIO(data), len(data), storage))
    return obj, _builder(lambda ref: _entry_bytes(f, entries[f"{prefix}data/{ref.key}"], writable=True))


def _entry_bytes(f: BinaryIO, entry: files.Entry, *, writable: bool = False) -> bytes | bytearray:
    buf = bytearray(entry.size)
    f.seek(entry.start)
    if f.readinto(buf) != entry.size:
        raise limits.LimitError("the file ended inside an entry (did it change while being read?)")
    if zlib.crc32(buf) != entry.crc:
        raise limits.LimitError("an entry's CRC does not match its bytes (a damaged or altered archive)")
    return buf if writable else bytes(buf)


def _read_legacy(f: BinaryIO, size: int) -> tuple[Any, Any]:
    """The format of ``torch.save(..., _use_new_zipfile_serialization=False)``: four pickles
    (magic number, protocol, system info, the object), the storage keys, then each storage
    as an 8-byte element count and its bytes."""
    limits.check("MAX_TOTAL_BYTES", size, "bytes of a legacy torch file")
    f.seek(0)
    data = limits.read_exactly(f, size)
    stream = io.BytesIO(data)
    storages: dict[str, pickles.StorageRef] = {}

    def next_pickle(storage=None) -> Any:
        return pickles.unpickle(pickles.TorchUnpickler(stream, size, storage, legacy=True))

    if next_pickle() != 0x1950A86A20F9469CFC6C:
        raise limits.LimitError("neither a zip archive nor a legacy torch file (no magic number)")
    if next_pickle() != 1001:
        raise limits.LimitError("a legacy torch file of an unknown protocol")
    info = next_pickle()
    if not (type(info) is dict and info.get("little_endian") is True):
        raise limits.LimitError("written on a big-endian machine: only little-endian files are read")
    obj = next_pickle(lambda ref: storages.setdefault(ref.key, ref))
    keys = next_pickle()
    if not (type(keys) is list and sorted(keys) == sorted(storages)):
        raise limits.LimitError("the list of storages does not match the storages the pickle uses")
    spans, at = {}, stream.tell()
    for key in keys:
        (count,) = struct.unpack("<q", data[at : at + 8]) if at + 8 <= size else (-1,)
        ref = storages[key]
        if count * ref.dtype.itemsize != ref.nbytes or at + 8 + ref.nbytes > size:
            raise limits.LimitError(
                f"storage {key}: the file does not hold the {ref.nbytes:,} bytes the pickle declares"
            )
        spans[key], at = (at + 8, ref.nbytes), at + 8 + ref.nbytes
    if at != size:
        raise limits.LimitError(f"{size - at:,} bytes after the last storage")
    view = memoryview(data)
    return obj, _builder(lambda ref: bytearray(view[spans[ref.key][0] : sum(spans[ref.key])]))


def _builder(read_storage):
    """A function pickles.TensorRef -> tensor that reads each storage once."""
    cache: dict[str, torch.Tensor] = {}

    def build(ref: pickles.TensorRef) -> torch.Tensor:
        if ref.numel == 0:
            return torch.empty(ref.size, dtype=ref.dtype)
        key = ref.storage.key
        if key not in cache:
            buf = read_storage(ref.storage)
            cache[key] = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        flat = cache[key].view(ref.dtype)
        return flat.as_strided(ref.size, ref.stride, ref.offset)

    return build


# --- Flax weights -----------------------------------------------------------------------------


def spec_metadata(spec: ModelSpec) -> dict[str, str]:
    """The header entries that let a file rebuild its model (see :func:`spec_from_metadata`)."""
    return {
        "model": spec.name,
        "config": json.dumps(dataclasses.asdict(spec.config)),
        "config_type": type(spec.config).__name__,
        "input_shape": json.dumps(list(spec.input_shape)),
    }


def write_arrays(
    path: str | Path, arrays: Mapping[str, Any], metadata: Mapping[str, str], *, not_same_as: Iterable = ()
) -> None:
    """numpy arrays and a string header as one safetensors file, atomically."""
    with atomic_path(Path(path), not_same_as=not_same_as) as tmp, open(tmp, "wb") as f:
        files.write(f, arrays, metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string header of a safetensors file, without reading its tensors."""
    with opened(path, "a valid safetensors file") as (f, size):
        return files.read_header(f, size)[1]


def read_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(numpy arrays, string header) of a safetensors file."""
    with opened(path, "a valid safetensors file") as (f, size):
        stored, metadata = files.read_header(f, size)
        arrays = {
            k: np.frombuffer(files.read_bytes(f, s), dtype=files.numpy_dtype(s.dtype)).reshape(s.shape)
            for k, s in stored.items()
        }
        return arrays, metadata


def write_flax(flat: Mapping[str, Any], spec: ModelSpec | str, path: str | Path, *, not_same_as: Iterable = ()) -> None:
    """Flat Flax arrays (validated against ``spec``) with the model name and configuration."""
    spec = get(spec)
    problems = transfer.validate(flat, transfer.flax_expected(spec), allow_nonfinite=False)
    if problems:
        raise transfer.TransferError(f"Flax variables -> '{spec.name}'", problems)
    write_arrays(path, flat, {"format": FORMAT, **spec_metadata(spec)}, not_same_as=not_same_as)


def is_flax_file(path: str | Path) -> bool:
    """Whether ``path`` is a Flax weights file of this project (reads the header only)."""
    try:
        return read_metadata(path).get("format") == FORMAT
    except CheckpointError:
        return False


def read_flax(path: str | Path) -> tuple[dict[str, np.ndarray], ModelSpec]:
    """(flat Flax arrays, the ModelSpec the file was written for)."""
    flat, metadata = read_arrays(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a Flax weights file of this project (format "
            f"{limits.printable(repr(metadata.get('format')), 80)}, expected {FORMAT!r})"
        )
    spec = spec_from_header(metadata, Path(path))
    tensors = len(transfer.plan(spec))  # from a build on the meta device: nothing allocated, nothing traced
    if len(flat) < tensors:  # before the Flax template is traced, whose work grows with the model
        raise CheckpointError(f"{path}: its header describes a model of {tensors:,} tensors; it holds {len(flat):,}")
    return flat, spec


def spec_from_header(metadata: Mapping[str, str], path: Path) -> ModelSpec:
    """:func:`spec_from_metadata` behind the checks of untrusted JSON: the configuration
    and input shape are bounded JSON before they are read, and whatever else goes wrong
    building the spec is a :class:`CheckpointError` naming the file."""
    for key in ("config", "input_shape"):
        if isinstance(metadata.get(key), str):
            try:
                limits.parse_json(metadata[key], f"header entry {key!r}")
            except limits.LimitError as e:
                raise CheckpointError(f"{path}: the model configuration in the header is unreadable ({e})") from None
    try:
        return spec_from_metadata(metadata, path)
    except CheckpointError:
        raise
    except Exception as e:  # the configuration's own checks, or a kind of failure not foreseen
        reason = f"{type(e).__name__}: {limits.printable(e, 200)}"
        raise CheckpointError(f"{path}: the model configuration in the header is unreadable ({reason})") from None


def spec_from_metadata(metadata: Mapping[str, str], path: Path) -> ModelSpec:
    from bnconfig import KINDS as kinds

    try:
        kind, name = metadata["config_type"], metadata["model"]
        fields, input_shape = json.loads(metadata["config"]), json.loads(metadata["input_shape"])
        if kind not in kinds or not isinstance(fields, dict) or not isinstance(name, str):
            raise ValueError(f"config_type {kind!r} with a config of type {type(fields).__name__}")
        problems = limits.config_problems(kind, fields, input_shape)  # sizes, before anything is built
        if problems:
            raise CheckpointError(f"{path}: the model configuration in the header is refused: " + "; ".join(problems))
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return ModelSpec(name, kinds[kind](**fields), tuple(input_shape))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: the model configuration in the header is unreadable ({_reason(e)})") from None
