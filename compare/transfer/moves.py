"""The transfer in every direction, through one flat Flax form: torch state_dicts, linen variables and nnx models.

One declarative table says how each torch layer type's tensors move (``LAYER_RULES``);
everything else is validation. Every direction goes through one flat Flax form,
``{"params/layer1/0/conv1/kernel": array, "batch_stats/bn1/mean": array, ...}``, which
linen variables and nnx state both flatten to, since layer names are the same.
Rules:
* strict: missing keys, unexpected keys, wrong shapes, incompatible dtypes and non-finite
  values (unless ``allow_nonfinite=True``) raise one :class:`TransferError` that lists
  every problem; nothing is half-loaded (validation runs before anything is written);
* state_dict prefixes ``_orig_mod.`` (``torch.compile``) and ``module.``
  (``DataParallel``/``DistributedDataParallel``) are stripped when every key carries them;
* float16/bfloat16 tensors go through float32 (exact); the way back takes ``dtype``;
* ``num_batches_tracked`` (torch int64) lives in Flax ``batch_stats`` as int32;
* the first Linear after a flatten has its input features permuted, (C, H, W) <-> (H, W, C).

Round trips are bit-exact in every direction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx, traverse_util

from compare.registry import ModelSpec
from compare.transfer.rules import _COUNT, NNX_SEED, FlatFlax, Port, flax_expected, plan, resolve
from compare.transfer.validation import TransferError, _numpy, strip_prefixes, validate

# --- torch <-> flat Flax ------------------------------------------------------------


def torch_to_flat(
    state_dict: Mapping[str, Any],
    spec: ModelSpec | Port | str,
    *,
    allow_nonfinite: bool = False,
    float_dtype=np.float32,
) -> FlatFlax:
    """A torch state_dict (tensors or numpy arrays) as flat Flax arrays, after validation.
    Floating tensors become ``float_dtype`` (float32; float64 for a float64 comparison)."""
    spec = resolve(spec)
    sd = strip_prefixes(state_dict)
    moves = plan(spec)
    expected = {m.torch_key: (m.torch_shape, "int" if m.is_count else "float") for m in moves if not m.flax_only}
    problems = validate(sd, expected, allow_nonfinite)
    if problems:
        raise TransferError(f"torch state_dict -> Flax '{spec.name}'", problems)
    flat = {}
    for m in moves:
        dtype = np.int32 if m.is_count else float_dtype
        if m.flax_only:  # a frozen BatchNorm's counter: it never counted
            flat[m.flax_key] = np.zeros((), np.int32)
            continue
        # a copy: jnp.asarray may alias numpy memory on CPU, and numpy() aliases the tensor,
        # so without it a later in-place torch update would change the Flax weights too
        flat[m.flax_key] = np.array(m.to_flax(_numpy(sd[m.torch_key])), dtype=dtype, copy=True)
    return flat


def flat_to_torch(
    flat: Mapping[str, Any],
    spec: ModelSpec | Port | str,
    *,
    dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
    allow_nonfinite: bool = False,
) -> OrderedDict[str, torch.Tensor]:
    """Flat Flax arrays as a torch state_dict, after validation.

    Args:
      dtype: the torch dtype of floating tensors (default float32), or a mapping from
        state_dict key to dtype, such as ``{k: v.dtype for k, v in original.items()}``
        to give a bfloat16 checkpoint its dtype back. Counters are int64.
    """
    spec = resolve(spec)
    expected = flax_expected(spec)
    problems = validate(flat, expected, allow_nonfinite)
    if problems:
        raise TransferError(f"Flax variables -> torch '{spec.name}'", problems)
    sd = OrderedDict()
    for m in plan(spec):
        if m.flax_only:
            continue
        value = torch.from_numpy(np.array(m.to_torch(_numpy(flat[m.flax_key]))))
        if m.is_count:
            sd[m.torch_key] = value.to(torch.int64)
        else:
            want = dtype.get(m.torch_key, torch.float32) if isinstance(dtype, Mapping) else dtype or torch.float32
            sd[m.torch_key] = value.to(want)
    return sd


# --- linen and nnx <-> flat Flax ------------------------------------------------------


def linen_to_flat(variables: Mapping[str, Any]) -> FlatFlax:
    """``{"params": ..., "batch_stats": ...}`` -> ``{"params/fc1/kernel": array, ...}``."""
    flat = traverse_util.flatten_dict(dict(variables))  # keys may hold ints (an nnx.List's entries)
    return {"/".join(map(str, k)): np.asarray(v) for k, v in flat.items()}


def flat_to_linen(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    nested = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
    return {"params": {}, "batch_stats": {}, **nested}


_NNX_COLLECTIONS = {nnx.Param: "params", nnx.BatchStat: "batch_stats"}


def _nnx_flat_variables(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        collection = next(c for t, c in _NNX_COLLECTIONS.items() if isinstance(var, t))
        out["/".join([collection, *map(str, path)])] = (path, var)
    return out


def nnx_to_flat(model: nnx.Module) -> FlatFlax:
    """Parameters and batch statistics of an nnx model, flat. RNG state is not included."""
    return {k: np.asarray(var.get_value()) for k, (_, var) in _nnx_flat_variables(model).items()}


def flat_into_nnx(
    model: nnx.Module, flat: Mapping[str, Any], *, allow_nonfinite: bool = False, what: str = "-> nnx", float_dtype=None
) -> None:
    """Write flat Flax arrays into ``model`` in place, after validating all of them.
    Floats take the model's dtype, or ``float_dtype`` when given."""
    current = _nnx_flat_variables(model)
    expected = {
        k: (tuple(var.get_value().shape), "int" if k.endswith(_COUNT) else "float") for k, (_, var) in current.items()
    }
    problems = validate(flat, expected, allow_nonfinite)
    if problems:
        from compare.transfer.twin import nnx_module_types, stock_batchnorms  # twin builds on this module

        stock = stock_batchnorms("nnx", nnx_module_types(model))
        counters = tuple(f"'batch_stats/{path.replace('.', '/')}/{_COUNT}'" for path in stock)
        problems = [*stock.values(), *(p for p in problems if not any(c in p for c in counters))]
        raise TransferError(what, problems)

    def dtype(key, var):
        return float_dtype if float_dtype is not None and not key.endswith(_COUNT) else var.get_value().dtype

    updates = [
        (path, var.replace(jnp.asarray(_numpy(flat[k]), dtype=dtype(k, var)))) for k, (path, var) in current.items()
    ]
    nnx.update(model, nnx.from_flat_state(updates))


# --- the public directions ------------------------------------------------------------


def _nnx_model(spec: ModelSpec | Port) -> nnx.Module:
    if isinstance(spec, Port):
        raise TypeError(f"'{spec.name}' is a custom network: pass its nnx twin as model=")
    return spec.build_nnx(nnx.Rngs(NNX_SEED))


def _check_linen(flat: FlatFlax, spec: ModelSpec | Port, what: str, allow_nonfinite: bool) -> None:
    expected = flax_expected(spec)
    problems = validate(flat, expected, allow_nonfinite)
    if problems:
        raise TransferError(what, problems)


def torch_to_linen(
    state_dict: Mapping[str, Any],
    spec: ModelSpec | Port | str,
    *,
    allow_nonfinite: bool = False,
    float_dtype=np.float32,
) -> dict:
    """A torch state_dict as linen variables ``{"params", "batch_stats"}`` for ``spec``."""
    return flat_to_linen(torch_to_flat(state_dict, spec, allow_nonfinite=allow_nonfinite, float_dtype=float_dtype))


def linen_to_torch(
    variables: Mapping[str, Any], spec: ModelSpec | Port | str, *, dtype=None, allow_nonfinite: bool = False
):
    """Linen variables as a torch state_dict for ``spec`` (see :func:`flat_to_torch`)."""
    return flat_to_torch(linen_to_flat(variables), spec, dtype=dtype, allow_nonfinite=allow_nonfinite)


def torch_to_nnx(
    state_dict: Mapping[str, Any],
    spec: ModelSpec | Port | str,
    model: nnx.Module | None = None,
    *,
    allow_nonfinite: bool = False,
    float_dtype=None,
) -> nnx.Module:
    """Load a torch state_dict into ``model`` (built from ``spec`` when None) and return it.
    Floats take the model's dtype (float32), or ``float_dtype`` when given."""
    spec = resolve(spec)
    flat = torch_to_flat(state_dict, spec, allow_nonfinite=allow_nonfinite, float_dtype=float_dtype or np.float32)
    model = _nnx_model(spec) if model is None else model
    what = f"torch state_dict -> nnx '{spec.name}'"
    flat_into_nnx(model, flat, allow_nonfinite=allow_nonfinite, what=what, float_dtype=float_dtype)
    return model


def nnx_to_torch(model: nnx.Module, spec: ModelSpec | Port | str, *, dtype=None, allow_nonfinite: bool = False):
    """An nnx model's parameters and statistics as a torch state_dict for ``spec``."""
    return flat_to_torch(nnx_to_flat(model), spec, dtype=dtype, allow_nonfinite=allow_nonfinite)


def linen_to_nnx(
    variables: Mapping[str, Any],
    spec: ModelSpec | Port | str,
    model: nnx.Module | None = None,
    *,
    allow_nonfinite: bool = False,
) -> nnx.Module:
    """Load linen variables into an nnx model (built from ``spec`` when None)."""
    spec = resolve(spec)
    flat = linen_to_flat(variables)
    _check_linen(flat, spec, f"linen variables -> nnx '{spec.name}'", allow_nonfinite)
    model = _nnx_model(spec) if model is None else model
    flat_into_nnx(model, flat, allow_nonfinite=allow_nonfinite, what=f"linen variables -> nnx '{spec.name}'")
    return model


def nnx_to_linen(model: nnx.Module, spec: ModelSpec | Port | str, *, allow_nonfinite: bool = False) -> dict:
    """An nnx model's parameters and statistics as linen variables for ``spec``."""
    spec = resolve(spec)
    flat = nnx_to_flat(model)
    _check_linen(flat, spec, f"nnx -> linen '{spec.name}'", allow_nonfinite)
    return flat_to_linen(flat)
