"""Dataset files, untrusted like every file: MNIST-style IDX files (gzipped or not) and
CIFAR-10's python batches (pickles), for ``compare.experiments.data``.

Budgets, checked before the work: a file of at most :data:`~compare.io.limits.MAX_DATASET_BYTES`;
a ``.gz`` file inflated as a stream, to at most twice its size plus
:data:`~compare.io.limits.MEMORY_SLACK_BYTES`; an IDX header's shape backed byte for byte
by the file; a CIFAR batch unpickled by :class:`compare.io.pickles.Bounded` (at most
:data:`~compare.io.limits.MAX_DATASET_PICKLE_STEPS` steps, keys checked before they are
hashed) whose only globals are stand-ins that build numpy arrays of numbers from bytes the
file holds: nothing is allocated that the file does not back.
"""

from __future__ import annotations

import io
import math
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from compare.io import limits, pickles

_NUMBERS = {f"{k}{n}" for k, sizes in (("u", "1248"), ("i", "1248"), ("f", "248")) for n in sizes} | {"b1"}


class DataError(limits.InputError):
    """A dataset file that is missing or not in the expected format; names the file."""


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"missing file: expected {data_dir / stem} or {data_dir / stem}.gz")


def _read_bounded(path: Path) -> bytes | bytearray:
    """The file's bytes (inflated for ``.gz``, as a stream), refused past the budgets before
    that much is held in memory."""
    try:
        f, size = limits.open_regular(path)
        with f:
            limits.check("MAX_DATASET_BYTES", size, "bytes of a dataset file")
            return _inflate(f, size) if path.suffix == ".gz" else limits.read_exactly(f, size)
    except limits.BudgetError as e:
        raise DataError(f"{path}: refused: {e}") from None
    except limits.LimitError as e:
        raise DataError(f"{path}: {e}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None


def _inflate(f, size: int) -> bytearray:
    """A gzip stream (one member or more), inflated twice: once to count its bytes within
    the budget, holding nothing, then into a buffer of exactly that size."""
    room = min(limits.limit("MAX_DATASET_BYTES"), limits.memory_budget(size))
    total = _gunzip(f, room, None)
    out = bytearray(total)
    f.seek(0)
    _gunzip(f, room, memoryview(out))
    return out


def _gunzip(f, room: int, out: memoryview | None) -> int:
    at, inflate = 0, zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
    try:
        while chunk := f.read(1 << 20):
            while chunk:
                if inflate.eof:  # another gzip member follows
                    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                piece = inflate.decompress(chunk, min(1 << 20, room + 1 - at))
                if at + len(piece) > room:
                    raise limits.BudgetError(
                        f"inflates to more than {room:,} bytes: the budget of a .gz file is the lesser of "
                        f"MAX_DATASET_BYTES and twice its size plus MEMORY_SLACK_BYTES (raise them with the "
                        f"environment variables {limits.ENV_PREFIX}MAX_DATASET_BYTES and "
                        f"{limits.ENV_PREFIX}MEMORY_SLACK_BYTES)"
                    )
                if out is not None:
                    if at + len(piece) > len(out):
                        raise limits.LimitError("the file changed while being read")
                    out[at : at + len(piece)] = piece
                at += len(piece)
                chunk = inflate.unconsumed_tail or (inflate.unused_data if inflate.eof else b"")
    except zlib.error as e:
        raise limits.LimitError(f"not a valid gzip file ({e})") from None
    if not inflate.eof:
        raise limits.LimitError("not a valid gzip file (the compressed stream is truncated)")
    return at


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not): magic 0x0803 (images, 3 dims) or 0x0801 (labels)."""
    raw = _read_bounded(path)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(
            f"{path}: wrong magic number 0x{bytes(raw[:4]).hex()}: expected 0x00000801 (labels) or 0x00000803 (images)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes, expected {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if math.prod(shape) > limits.limit("MAX_DATASET_BYTES"):
        raise DataError(
            f"{path}: refused: declares an array of shape {shape}: "
            + limits.over("MAX_DATASET_BYTES", math.prod(shape))
        )
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for an array of shape {shape} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels from {labels.min()} to {labels.max()}, expected 0 to {num_classes - 1}")


# --- CIFAR-10 python batches ----------------------------------------------------------------


class _DType:
    """numpy.dtype(code) as the pickle builds it (its state only sets the byte order)."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if code not in _NUMBERS:
            raise pickles.Refused(f"array dtype {limits.printable(repr(code), 40)}: only numbers are allowed")
        self.code, self.order = code, "|"

    def resolve(self) -> np.dtype:
        return np.dtype(self.code).newbyteorder("<" if self.order in "<|=" else ">")


class _Array:
    """An array the pickle declares (``_reconstruct``); built by BUILD from its bytes."""

    array: np.ndarray | None = None


def _array(data: Any, dtype: Any, shape: Any, order: str = "C") -> np.ndarray:
    """The array of ``shape`` and ``dtype`` over exactly the bytes ``data`` (no copy)."""
    if not (isinstance(dtype, _DType) and type(shape) is tuple and len(shape) <= 8):
        raise pickles.Refused("an array without a number dtype and a shape")
    if not all(type(d) is int and 0 <= d < 1 << 40 for d in shape) or order not in ("C", "F"):
        raise pickles.Refused("array shape is not a tuple of non-negative ints")
    size = math.prod(shape) * dtype.resolve().itemsize
    limits.check("MAX_DATASET_BYTES", size, "bytes of one array")
    if not isinstance(data, (bytes, bytearray)) or len(data) != size:
        found = f"{len(data):,}" if isinstance(data, (bytes, bytearray)) else "no"
        raise pickles.Refused(f"an array of shape {shape} {dtype.resolve()} over {found} bytes")
    return np.frombuffer(data, dtype=dtype.resolve()).reshape(shape, order=order)


class _CifarUnpickler(pickles.Bounded):
    """Plain containers and numpy arrays of numbers, each over the bytes the file holds."""

    STEPS: ClassVar[str] = "MAX_DATASET_PICKLE_STEPS"
    WHAT: ClassVar[str] = "numpy arrays"
    KEY_TYPES: ClassVar[tuple[type, ...]] = (bytes, str, int)
    NDARRAY = object()  # numpy.ndarray, as an argument of _reconstruct

    def find_class(self, module: str, name: str) -> Any:
        numpy = module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                           "numpy._core.numeric")  # fmt: skip
        calls = {"dtype": _DType, "_reconstruct": self._reconstruct, "scalar": self._scalar, "_frombuffer": _array}
        if numpy and name == "ndarray":
            return self.NDARRAY
        if numpy and name in calls:
            return pickles._Call(calls[name])
        if (module, name) == ("_codecs", "encode"):  # protocol 2's bytes
            return pickles._Call(pickles.encode)
        raise pickles.Refused(
            f"refusing to load {limits.printable(module, 80)}.{limits.printable(name, 80)}: only numpy arrays are allowed"
        )

    def _reconstruct(self, cls: Any, shape: Any, typecode: Any) -> _Array:
        if cls is not self.NDARRAY or shape != (0,) or typecode != b"b":
            raise pickles.Refused("numpy's _reconstruct with other arguments than an empty array's")
        return _Array()

    def _scalar(self, dtype: Any, data: Any) -> int | float:
        return _array(data, dtype, ())[()].item()

    def build(self, inst: Any, state: Any) -> Any:
        if isinstance(inst, _DType) and type(state) is tuple and len(state) >= 5 and state[2:5] == (None,) * 3:
            inst.order = state[1] if state[1] in ("<", ">", "|", "=") else "?"
            return inst
        if isinstance(inst, _Array) and inst.array is None and type(state) is tuple and len(state) == 5:
            _, shape, dtype, fortran, data = state
            inst.array = _array(data, dtype, shape, "F" if fortran is True else "C")
            return inst
        return super().build(inst, state)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,)) from one CIFAR-10 python batch."""
    raw = _read_bounded(path)
    try:
        batch = pickles.unpickle(_CifarUnpickler(io.BytesIO(raw), len(raw), encoding="bytes"))
    except limits.BudgetError as e:
        raise DataError(f"{path}: refused: {e}") from None
    except limits.LimitError as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    data = data.array if isinstance(data, _Array) else data
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8):
        kind = f"{type(data).__name__} {getattr(data, 'dtype', '')}"
        raise DataError(f"{path}: b'data' must be a uint8 array, got {kind}")
    if not (type(labels) is list and all(type(v) is int for v in labels)):
        raise DataError(f"{path}: b'labels' must be a list of ints")
    if not all(0 <= v < 10 for v in labels):
        low, high = (v if abs(v) < 1 << 63 else "a huge int" for v in (min(labels), max(labels)))
        raise DataError(f"{path}: labels from {low} to {high}, expected 0 to 9")
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise DataError(f"{path}: data {data.shape} and labels {labels.shape}: expected (N, 3072) and (N,)")
    return data.reshape(-1, 3, 32, 32), labels
