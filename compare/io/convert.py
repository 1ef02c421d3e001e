"""Weights files from one framework to the other: a torch state_dict file (``.pt``/``.pth``
or ``.safetensors``) to a Flax ``.safetensors`` file whose header names the model, and
back. Both validate every key and shape (``compare.transfer``) before writing anything,
and never write over their source (by device and inode); the command line is
``python -m compare.convert``."""

from __future__ import annotations

import contextlib
from pathlib import Path

from compare import registry, transfer
from compare.io import checkpoint


@contextlib.contextmanager
def _naming(path: Path):
    """A TransferError raised inside names the file its input came from."""
    try:
        yield
    except transfer.TransferError as e:
        raise e.with_file(path) from None


def flax_file_to_torch(src: Path, dst: Path, model: str | None = None, *, allow_nonfinite: bool = False) -> str:
    """A Flax file (it knows its model) to a torch state_dict file. ``model``, if given,
    must be the header's name and the arrays must fit that registry model's keys and
    shapes. Returns a one-line summary."""
    flat, spec = checkpoint.read_flax(src)
    if model:  # the arrays must fit the named architecture, not only the header's label
        if model != spec.name:
            raise checkpoint.CheckpointError(f"{src}: holds a {spec.name!r}, not a {model!r} (the name in its header)")
    with _naming(src):
        if model:
            transfer.flat_to_torch(flat, registry.get(model), allow_nonfinite=allow_nonfinite)
        sd = transfer.flat_to_torch(flat, spec, allow_nonfinite=allow_nonfinite)
    checkpoint.write_torch_state_dict(sd, dst, not_same_as=[src])
    return f"converted Flax {spec.name} ({len(flat)} arrays) -> torch state_dict ({len(sd)} tensors): {dst}"


def torch_file_to_flax(src: Path, dst: Path, model: str, *, allow_nonfinite: bool = False) -> str:
    """A torch state_dict file for the registry model ``model`` to a Flax file. Returns a
    one-line summary."""
    spec = registry.get(model)
    sd = checkpoint.read_torch_state_dict(src)
    with _naming(src):
        flat = transfer.torch_to_flat(sd, spec, allow_nonfinite=allow_nonfinite)
        checkpoint.write_flax(flat, spec, dst, not_same_as=[src])
    n_params = sum(1 for k in flat if k.startswith("params/"))
    return (
        f"converted torch {spec.name} ({len(sd)} tensors) -> Flax ({n_params} params, "
        f"{len(flat) - n_params} batch_stats): {dst}"
    )
