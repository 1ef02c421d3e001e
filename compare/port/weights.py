"""The weight map of a port: the moves its layers declared (the transfer's rules, see
``compare.port.ops.layers``), checked against the torch model, and the transfer in both
directions, strict and bit-exact as ``compare.transfer`` is (the same validation, the
same flat Flax form, the same linen and nnx writers).

A tensor of the state_dict that no traced forward reads (an unused head, say) has no
Flax counterpart: it is listed as ``unused``, left out of the Flax side, and left as it
is in torch by :func:`into_torch`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from compare import transfer
from compare.transfer import FlatFlax, Move, TransferError


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    return np.asarray(x)


def unused(moves: Sequence[Move], model: torch.nn.Module) -> list[str]:
    """State_dict keys of ``model`` that no move reads; raises when two tensors would
    land on one Flax key."""
    flax_keys: dict[str, str] = {}
    for m in moves:
        if m.flax_key in flax_keys:
            raise TransferError("port", [f"{m.torch_key!r} and {flax_keys[m.flax_key]!r} both map to {m.flax_key!r}"])
        flax_keys[m.flax_key] = m.torch_key
    moved = {m.torch_key for m in moves}
    return [k for k in model.state_dict() if k not in moved]


def _expected(moves: Sequence[Move]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {m.torch_key: (m.torch_shape, "int" if m.is_count else "float") for m in moves}


def torch_to_flat(
    state_dict: Mapping[str, Any], moves: Sequence[Move], skip: Sequence[str] = (), *, float_dtype=np.float32
) -> FlatFlax:
    """A torch state_dict as flat Flax arrays, after validating every moved tensor; the
    keys in ``skip`` (unused by forward) may be present and are ignored."""
    sd = {k: v for k, v in transfer.strip_prefixes(state_dict).items() if k not in set(skip)}
    problems = transfer.validate(sd, _expected(moves), allow_nonfinite=False)
    if problems:
        raise TransferError("torch state_dict -> ported Flax module", problems)
    flat = {}
    for m in moves:
        dtype = np.int32 if m.is_count else float_dtype
        flat[m.flax_key] = np.array(m.to_flax(_numpy(sd[m.torch_key])), dtype=dtype, copy=True)
    return flat


def flat_to_torch(flat: Mapping[str, Any], moves: Sequence[Move], *, dtype: torch.dtype = torch.float32):
    """Flat Flax arrays as the moved part of a torch state_dict, after validation."""
    expected = {m.flax_key: (_flax_shape(m), "int" if m.is_count else "float") for m in moves}
    problems = transfer.validate(flat, expected, allow_nonfinite=False)
    if problems:
        raise TransferError("ported Flax module -> torch state_dict", problems)
    sd = OrderedDict()
    for m in moves:
        value = torch.from_numpy(np.array(m.to_torch(_numpy(flat[m.flax_key]))))
        sd[m.torch_key] = value.to(torch.int64 if m.is_count else dtype)
    return sd


def _flax_shape(m: Move) -> tuple[int, ...]:
    """The Flax shape of a moved tensor, from a zero-stride stand-in (nothing of its size is allocated)."""
    stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), m.torch_shape, (0,) * len(m.torch_shape))
    return tuple(np.shape(m.to_flax(stand_in)))


def into_torch(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], skip: Sequence[str]) -> None:
    """Copy the moved tensors into ``model`` in place (a module's own ``_load_from_state_dict``,
    such as torchvision MNASNet's version check, is not asked); the unused ones stay."""
    current = model.state_dict(keep_vars=True)
    missing = sorted(set(current) - set(state_dict) - set(skip))
    unexpected = sorted(set(state_dict) - set(current))
    if missing or unexpected:
        raise TransferError("-> torch", [f"missing {missing}", f"unexpected {unexpected}"])
    with torch.no_grad():
        for k, v in state_dict.items():
            current[k].copy_(v)
