"""Bytes on disk: atomic writes that go only where they are meant to (:func:`atomic_path`),
and the containers this project parses itself, once, so that what is checked is what is
read: safetensors (:func:`read_header`, :func:`write`) and the zip archive of ``torch.save``
(:func:`zip_entries`). docs/files.md says what each refuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import stat
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from compare.io import limits
from compare.io.limits import LimitError

STALE_TMP_SECONDS = 600  # a temporary file of ours this old beside a destination is a killed writer's
_LIBRARY_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")  # the safetensors library's temporaries (Rust tempfile)

DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
    "F64": "float64",
}  # fmt: skip  # the dtypes of weights; float8 and complex are refused
ITEMSIZE = {code: 1 if code == "BOOL" else int(code.lstrip("BFIU")) // 8 for code in DTYPES}


class WriteError(limits.InputError):
    """A destination that this project will not write: a link, not a regular file, the
    source itself, or a place that cannot be written."""


# --- atomic writes ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path, *, not_same_as: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yields a new temporary path next to ``path``; on success it is fsynced and renamed
    over ``path`` (atomic on POSIX), on failure removed. ``not_same_as``: files (sources)
    that ``path`` must not be, by device and inode (a link, a hard link or a bind mount of
    a source is refused). Raises :class:`WriteError`."""
    path = Path(path)
    _check_destination(path, not_same_as)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(f"{path}: cannot write there ({e.strerror or e})") from None
    tmp = Path(name)
    try:
        os.fchmod(fd, _mode_for(path))
    finally:
        os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        _check_destination(path, not_same_as)  # again, as late as possible
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # not every file system syncs a folder
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as e:
        raise WriteError(f"{path}: cannot write there ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _check_destination(path: Path, not_same_as: Iterable[str | Path]) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise WriteError(f"{path}: cannot write there ({e.strerror or e})") from None
    if stat.S_ISLNK(info.st_mode):
        raise WriteError(f"{path}: is a symbolic link; refusing to write through it (remove it or choose another name)")
    if not stat.S_ISREG(info.st_mode):
        raise WriteError(f"{path}: is {limits.kind_of(info.st_mode)}, not a regular file; refusing to replace it")
    for source in not_same_as:
        with contextlib.suppress(OSError):
            other = os.stat(source)
            if (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino):
                raise WriteError(f"{path}: is the same file as {source} (same device and inode): it would be replaced")


def _mode_for(path: Path) -> int:
    """A replaced file's permissions, or those the umask gives a new file."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(os.lstat(path).st_mode)
    return 0o666 & ~_umask()


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError, StopIteration):  # Linux: read it without changing it
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def _remove_stale(path: Path) -> None:
    """Temporary files that a killed writer left for ``path``: our exact names
    (``.<name>.<8 chars>.tmp``) and the safetensors library's (``.tmp<6 chars>`` holding the
    start of a safetensors file); regular files of this user, older than
    :data:`STALE_TMP_SECONDS`. Nothing else is touched."""
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    now = time.time()
    with os.scandir(path.parent) as entries:
        for entry in entries:
            if not (ours.fullmatch(entry.name) or _LIBRARY_TMP.fullmatch(entry.name)):
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                old = stat.S_ISREG(info.st_mode) and now - info.st_mtime > STALE_TMP_SECONDS
                if (
                    old
                    and info.st_uid == os.getuid()
                    and (ours.fullmatch(entry.name) or _starts_like_safetensors(entry))
                ):
                    os.unlink(entry.path)


def _starts_like_safetensors(entry: os.DirEntry) -> bool:
    fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and int.from_bytes(head[:8], "little") < limits.MAX_HEADER_BYTES and head[8:] == b"{"


# --- safetensors ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors file: its dtype code, shape and bytes in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # offset in the file
    nbytes: int


def read_header(f: BinaryIO, size: int) -> tuple[dict[str, Stored], dict[str, str]]:
    """The tensors and the string metadata of an open safetensors file of ``size`` bytes,
    validated without reading the data: the header within the file and
    :data:`~compare.io.limits.MAX_HEADER_BYTES`, bounded JSON, names that print, known
    dtypes, shapes of non-negative ints within the budgets, byte ranges that hold exactly
    their shapes and tile the data with no gap or overlap. Raises :class:`LimitError`."""
    if size < 8:
        raise LimitError(f"{size} bytes: too short for a safetensors header")
    n = int.from_bytes(limits.read_exactly(f, 8), "little")
    if n > size - 8:
        raise LimitError(f"the header declares {n:,} bytes; the file has {size - 8:,} after the length field")
    limits.check("MAX_HEADER_BYTES", n, "bytes of the header")
    header = limits.parse_json(limits.read_exactly(f, n), "the header")
    if not isinstance(header, dict):
        raise LimitError(f"the header is a JSON {type(header).__name__}, expected an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LimitError("__metadata__ must map strings to strings")
    bad = [k for k in [*meta, *meta.values(), *header] if not limits.clean_text(k)]
    if bad:
        raise LimitError(f"a name or metadata entry with control characters: {limits.printable(repr(bad[0]), 80)}")
    limits.check("MAX_TENSORS", len(header), "tensors")
    problems, stored = [], {}
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            problems.append(f"{limits.printable(repr(name), 80)}: {problem}")
            continue
        begin, end = entry["data_offsets"]
        stored[name] = Stored(entry["dtype"], tuple(entry["shape"]), 8 + n + begin, end - begin)
    if problems:
        raise LimitError(limits.summary(problems))
    total, data = 0, size - 8 - n
    for name, s in sorted(stored.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)):
        if s.start - 8 - n != total:
            what = "overlaps the tensor before it" if s.start - 8 - n < total else "leaves a gap before it"
            raise LimitError(f"{limits.printable(repr(name), 80)}: its bytes {what} (the data must tile the file)")
        total += s.nbytes
    if total != data:
        raise LimitError(f"the tensors hold {total:,} bytes; the file has {data:,} after the header")
    limits.check("MAX_TOTAL_BYTES", total, "bytes of tensors")
    return stored, meta


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return "expected {dtype, shape, data_offsets}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        return f"dtype {limits.printable(repr(dtype), 40)} is not one of {sorted(DTYPES)}"
    if not (isinstance(shape, list) and len(shape) <= 16 and all(type(d) is int and 0 <= d < 1 << 48 for d in shape)):
        return f"shape {limits.printable(shape, 80)} is not a list of at most 16 non-negative ints"
    elements = math.prod(shape)
    if elements > limits.limit("MAX_TENSOR_ELEMENTS"):
        return limits.over("MAX_TENSOR_ELEMENTS", elements)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        return f"data_offsets {limits.printable(offsets, 80)} is not two non-negative ints"
    if offsets[1] - offsets[0] != elements * ITEMSIZE[dtype]:
        return f"bytes [{offsets[0]}, {offsets[1]}) do not hold {shape} {dtype}"
    return None


def read_bytes(f: BinaryIO, s: Stored) -> bytearray:
    """The bytes of one tensor (a new, writable buffer of exactly its size)."""
    buf = bytearray(s.nbytes)
    f.seek(s.start)
    if f.readinto(buf) != s.nbytes:
        raise LimitError("the file ended early (did it change while being read?)")
    return buf


def numpy_dtype(code: str) -> np.dtype:
    if code == "BF16":
        import ml_dtypes  # installed with jax: numpy has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(DTYPES[code]).newbyteorder("<")


def write(f: BinaryIO, arrays: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
    """numpy arrays or torch tensors (any contiguous, little-endian layout) and string
    metadata as a safetensors file, streamed to ``f`` without a copy of the data. The
    largest dtypes come first and the header is padded to 8 bytes, so every tensor is
    aligned to its item size."""
    raw = {name: _as_bytes(value) for name, value in arrays.items()}
    order = sorted(raw, key=lambda k: (-ITEMSIZE[raw[k][0]], k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        code, shape, data = raw[name]
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little") + text)
    for name in order:
        f.write(raw[name][2])


_CODES = {name: code for code, name in DTYPES.items()}  # numpy's and torch's dtype names alike


def _as_bytes(value: Any) -> tuple[str, tuple[int, ...], memoryview]:
    """(dtype code, shape, the bytes) of an array or tensor, copied only when it is not
    C-contiguous and little-endian."""
    if type(value).__module__.startswith("torch"):
        shape, name = tuple(value.shape), str(value.dtype).removeprefix("torch.")
        flat = value.detach().cpu().contiguous().reshape(-1).view(_torch_uint8()).numpy()
    else:
        value = np.asarray(value)
        if value.dtype.byteorder == ">":
            value = value.astype(value.dtype.newbyteorder("<"))
        shape, name = value.shape, value.dtype.name
        flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    if name not in _CODES:
        raise ValueError(f"dtype {name} cannot be written to safetensors here; expected one of {sorted(_CODES)}")
    return _CODES[name], shape, memoryview(flat)


def _torch_uint8():
    import torch

    return torch.uint8


# --- the zip archive -----------------------------------------------------------------------

_EOCD, _LOCATOR, _EOCD64 = struct.Struct("<4s4H2IH"), struct.Struct("<4sIQI"), struct.Struct("<4sQ2H2I4Q")
_CENTRAL, _LOCAL = struct.Struct("<4s6H3I5H2I"), struct.Struct("<4s5H3I2H")


@dataclasses.dataclass(frozen=True)
class Entry:
    start: int  # of the data
    size: int
    crc: int


def zip_entries(f: BinaryIO, size: int) -> dict[str, Entry]:
    """The entries of a ``torch.save`` zip archive, each name with its data's place, from
    one strict parse (see the module's docstring). Raises :class:`LimitError`."""
    if size < _EOCD.size:
        raise LimitError("too short for a zip archive")
    f.seek(size - _EOCD.size)
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment = _EOCD.unpack(f.read(_EOCD.size))
    if sig != b"PK\x05\x06" or comment or disk or cd_disk or n_disk != n_total:
        raise LimitError("the zip end record is not the last 22 bytes of the file (one disk, no comment)")
    end = size - _EOCD.size
    if end >= _LOCATOR.size + _EOCD64.size:
        f.seek(end - _LOCATOR.size)
        sig, z_disk, z_offset, disks = _LOCATOR.unpack(f.read(_LOCATOR.size))
        if sig == b"PK\x06\x07":
            if z_disk != 0 or disks != 1 or z_offset != end - _LOCATOR.size - _EOCD64.size:
                raise LimitError("the zip64 locator names other disks or another place")
            f.seek(z_offset)
            sig, rec, _, _, d1, d2, m_disk, m_total, m_size, m_offset = _EOCD64.unpack(f.read(_EOCD64.size))
            if sig != b"PK\x06\x06" or rec != _EOCD64.size - 12 or d1 or d2 or m_disk != m_total:
                raise LimitError("the zip64 end record is malformed or names other disks")
            for small, big, full in (
                (n_total, m_total, 0xFFFF),
                (cd_size, m_size, 0xFFFFFFFF),
                (cd_offset, m_offset, 0xFFFFFFFF),
            ):
                if small not in (big, full):
                    raise LimitError("the zip and zip64 end records disagree")
            n_total, cd_size, cd_offset, end = m_total, m_size, m_offset, z_offset
    if cd_offset + cd_size != end:
        raise LimitError("the central directory does not end where the end record begins")
    limits.check("MAX_ARCHIVE_ENTRIES", n_total, "entries in the archive")
    f.seek(cd_offset)
    central = limits.read_exactly(f, cd_size)
    entries, spans, at = {}, [], 0
    for _ in range(n_total):
        name, raw_name, local_offset, crc, length, at = _central_entry(central, at)
        if name in entries:
            raise LimitError(f"entry {limits.printable(repr(name), 80)} appears twice")
        f.seek(local_offset)
        head = limits.read_exactly(f, _LOCAL.size)
        sig, _, flags, method, _, _, _, _, _, n_len, e_len = _LOCAL.unpack(head)
        start = local_offset + _LOCAL.size + n_len + e_len
        if sig != b"PK\x03\x04" or method or flags & 1 or f.read(n_len) != raw_name:
            raise LimitError(f"entry {limits.printable(repr(name), 80)}: its local header disagrees with the directory")
        entries[name] = Entry(start, length, crc)
        spans.append((local_offset, start + length))
    if at != len(central):
        raise LimitError("the central directory holds more than its entries")
    spans.sort()
    for (_, end_a), (begin_b, _) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise LimitError("two entries of the archive share bytes")
    if spans and spans[-1][1] > cd_offset:
        raise LimitError("an entry runs into the central directory")
    return entries


def _central_entry(central: bytes, at: int) -> tuple[str, bytes, int, int, int, int]:
    if at + _CENTRAL.size > len(central):
        raise LimitError("the central directory ends inside an entry")
    fields = _CENTRAL.unpack_from(central, at)
    sig, _, _, flags, method, _, _, crc, csize, usize, n_len, e_len, c_len, disk, _, _, offset = fields
    raw_name = central[at + _CENTRAL.size : at + _CENTRAL.size + n_len]
    extra = central[at + _CENTRAL.size + n_len : at + _CENTRAL.size + n_len + e_len]
    nxt = at + _CENTRAL.size + n_len + e_len + c_len
    if sig != b"PK\x01\x02" or nxt > len(central):
        raise LimitError("a central directory entry is malformed")
    try:
        name = raw_name.decode("utf-8" if flags & 0x800 else "ascii")
    except UnicodeDecodeError:
        raise LimitError("an entry name is not UTF-8") from None
    wide = [
        v for v, full in ((usize, 0xFFFFFFFF), (csize, 0xFFFFFFFF), (offset, 0xFFFFFFFF), (disk, 0xFFFF)) if v == full
    ]
    if wide:
        values = _zip64_extra(extra, len(wide))
        usize, csize, offset, disk = (
            values.pop(0) if v == full else v
            for v, full in ((usize, 0xFFFFFFFF), (csize, 0xFFFFFFFF), (offset, 0xFFFFFFFF), (disk, 0xFFFF))
        )
    if method != 0 or flags & 1 or csize != usize or disk != 0:
        raise LimitError(
            f"entry {limits.printable(repr(name), 80)} is compressed, encrypted or on another disk "
            "(torch.save stores entries uncompressed)"
        )
    return name, raw_name, offset, crc, usize, nxt


def _zip64_extra(extra: bytes, count: int) -> list[int]:
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<2H", extra, at)
        if tag == 1 and length >= 8 * count and at + 4 + length <= len(extra):
            return list(struct.unpack_from(f"<{count}Q", extra, at + 4))
        at += 4 + length
    raise LimitError("an entry's zip64 sizes are missing")
