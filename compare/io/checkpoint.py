"""Weight files that cannot run code, written atomically, read with clear errors.

* Flax side: one ``.safetensors`` file holding the flat Flax arrays
  (``params/fc1/kernel``, ``batch_stats/bn1/mean``, ...) and, in its JSON header
  metadata, the model name and configuration, so that the file alone rebuilds the model.
* torch side: ``.safetensors`` (a state_dict) is preferred; legacy ``.pt``/``.pth`` files
  are read with ``torch.load(..., weights_only=True)`` only, which refuses any pickle that
  would construct something other than tensors and plain containers. Never a plain
  unpickle.
* Safetensors, not orbax: a single file, no code on load, readable by torch and numpy
  alike, and the same format on both sides of a conversion.
* Writes are atomic: a temporary file in the destination's folder, flushed and fsynced,
  then ``os.replace``; a writer killed at any point leaves the previous file intact. A file
  that is replaced keeps its permissions; temporary files that a killed writer left beside
  the destination are removed by the next write there.
* Every file is untrusted: its header and declared sizes are checked against
  ``compare.io.limits`` before anything is allocated, and every malformed input raises a
  :class:`CheckpointError` that names the file and the problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch_file
from safetensors.torch import save_file as save_torch_file

from compare import transfer
from compare.io import limits
from compare.registry import ModelSpec, get

FORMAT = "bn-dropout-parity/flax-weights/1"
STALE_TMP_SECONDS = 600  # a temporary file of ours this old beside a destination is a killed writer's


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not what was asked for."""


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it is fsynced and renamed
    over ``path`` (atomic on POSIX), on failure removed. The folder is fsynced too."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write there ({e.strerror or e})") from None
    os.close(fd)
    tmp = Path(tmp)
    if path.exists():
        mode = path.stat().st_mode & 0o7777  # a replaced file keeps its permissions
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # mkstemp makes 0600; give a new file the usual permissions
    os.chmod(tmp, mode)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_stale_tmp(path: Path) -> None:
    """Temporary files of :func:`atomic_path` for ``path`` that a killed writer left behind."""
    now = time.time()
    for old in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > STALE_TMP_SECONDS:
                old.unlink()


def _check_readable(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    return path


# --- torch state_dicts ----------------------------------------------------------------------


def read_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torch state_dict from ``.safetensors``, or from ``.pt``/``.pth`` through
    ``torch.load(weights_only=True)``. A full checkpoint dict with a ``state_dict`` or
    ``model`` entry is unwrapped."""
    path = _check_readable(path)
    if path.suffix == ".safetensors":
        _header(path)
        try:
            obj = load_torch_file(str(path))
        except Exception as e:  # the header was checked; anything the reader still finds is bad input
            raise CheckpointError(f"{path}: not a valid safetensors file ({_reason(e)})") from None
        return _checked_state_dict(path, obj)
    try:
        is_zip = limits.torch_archive(path)
    except limits.LimitError as e:
        raise CheckpointError(f"{path}: refused: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: refused: the pickle wants to build objects other than tensors ({reason})"
            ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({reason})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state_dict (a mapping of names to tensors), got a {type(obj).__name__}"
        )
    return _checked_state_dict(path, obj)


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _checked_state_dict(path: Path, obj: Mapping) -> dict[str, torch.Tensor]:
    """Every entry a string key and a dense, real-valued tensor no larger than its storage."""
    if len(obj) > limits.MAX_TENSORS:
        raise CheckpointError(f"{path}: {len(obj)} entries, more than the limit of {limits.MAX_TENSORS}")
    problems = [p for k, v in obj.items() for p in limits.tensor_problems(k, v)]
    if problems:
        raise CheckpointError(f"{path}: not a state_dict of dense tensors: " + "; ".join(problems))
    return dict(obj)


def _header(path: Path) -> dict:
    try:
        return limits.safetensors_header(path)
    except limits.LimitError as e:
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None


def write_torch_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """A state_dict as ``.safetensors`` (or ``.pt`` with ``torch.save``), atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            save_torch_file(tensors, str(tmp))
        else:
            torch.save(tensors, tmp)


# --- Flax weights -----------------------------------------------------------------------------


def spec_metadata(spec: ModelSpec) -> dict[str, str]:
    """The header entries that let a file rebuild its model (see :func:`spec_from_metadata`)."""
    return {
        "model": spec.name,
        "config": json.dumps(dataclasses.asdict(spec.config)),
        "config_type": type(spec.config).__name__,
        "input_shape": json.dumps(list(spec.input_shape)),
    }


def write_arrays(path: str | Path, arrays: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """numpy arrays and a string header as one safetensors file, atomically."""
    arrays = {k: np.array(v, order="C") for k, v in arrays.items()}  # (ascontiguousarray makes 0-d arrays 1-d)
    with atomic_path(Path(path)) as tmp:
        save_numpy(arrays, str(tmp), metadata=dict(metadata))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string header of a safetensors file, without reading its tensors."""
    return _header(_check_readable(path))["__metadata__"]


def read_arrays(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(numpy arrays, string header) of a safetensors file."""
    metadata = read_metadata(path)
    try:
        return load_numpy(str(path)), metadata
    except Exception as e:  # the header was checked; anything the reader still finds is bad input
        raise CheckpointError(f"{path}: not a valid safetensors file ({_reason(e)})") from None


def write_flax(flat: Mapping[str, Any], spec: ModelSpec | str, path: str | Path) -> None:
    """Flat Flax arrays (validated against ``spec``) with the model name and configuration."""
    spec = get(spec)
    transfer.flat_to_torch(flat, spec)  # validates keys, shapes, dtypes and finiteness
    write_arrays(path, flat, {"format": FORMAT, **spec_metadata(spec)})


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
            f"{path}: not a Flax weights file of this project (format {metadata.get('format')!r}, expected {FORMAT!r})"
        )
    return flat, spec_from_metadata(metadata, Path(path))


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
