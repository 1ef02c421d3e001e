"""Exact weight transfer between torch state_dicts, linen variables and nnx models.

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

import dataclasses
import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx, traverse_util
from torch import nn as tnn

from compare import conventions
from compare.registry import ModelSpec, get
from torchbn.config import CNNConfig

FlatFlax = dict[str, np.ndarray]  # "params/fc1/kernel" -> array
PREFIXES = ("_orig_mod.", "module.")
# An nnx model built here (``model=None``) gets nnx.Rngs(NNX_SEED): its weights are
# overwritten, its Dropout stream starts from this seed (pass ``model`` to choose).
NNX_SEED = 0
_COUNT = "num_batches_tracked"


def _same(a: np.ndarray) -> np.ndarray:
    return a


# torch layer type -> {torch tensor name: (Flax collection, Flax name, to_flax, to_torch)}
_BATCHNORM = {
    "weight": ("params", "scale", _same, _same),
    "bias": ("params", "bias", _same, _same),
    "running_mean": ("batch_stats", "mean", _same, _same),
    "running_var": ("batch_stats", "var", _same, _same),
    _COUNT: ("batch_stats", _COUNT, _same, _same),
}
LAYER_RULES: dict[type, dict[str, tuple[str, str, Callable, Callable]]] = {
    tnn.Linear: {
        "weight": ("params", "kernel", conventions.linear_to_dense, conventions.dense_to_linear),
        "bias": ("params", "bias", _same, _same),
    },
    tnn.Conv2d: {
        "weight": ("params", "kernel", conventions.oihw_to_hwio, conventions.hwio_to_oihw),
        "bias": ("params", "bias", _same, _same),
    },
    tnn.BatchNorm1d: _BATCHNORM,
    tnn.BatchNorm2d: _BATCHNORM,
}


class TransferError(ValueError):
    """A transfer input that does not fit the model. ``problems`` lists every one."""

    def __init__(self, what: str, problems: list[str]):
        self.what, self.problems = what, problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{what}: {len(problems)} problem(s), nothing was loaded:\n{lines}")


@dataclasses.dataclass(frozen=True)
class Move:
    """How one torch tensor moves to Flax and back."""

    torch_key: str
    flax_key: str
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]

    @property
    def is_count(self) -> bool:
        return self.torch_key.endswith(_COUNT)


def _flattened_inputs(spec: ModelSpec) -> dict[str, tuple[int, int, int]]:
    """Linear layers that read a flattened (C, H, W) feature map with H*W > 1."""
    if isinstance(spec.config, CNNConfig):
        return {"fc": spec.config.flatten_shape}
    return {}  # ResNet flattens after global pooling: (C, 1, 1), nothing to permute


@functools.lru_cache(maxsize=32)
def plan(spec: ModelSpec) -> tuple[Move, ...]:
    """Every torch state_dict entry of ``spec`` with its Flax key and layout changes,
    in state_dict order."""
    with torch.device("meta"):
        model = spec.build_torch()
    flattened = _flattened_inputs(spec)
    moves, uncovered = [], []
    for path, module in model.named_modules():
        rules = next((r for kind, r in LAYER_RULES.items() if type(module) is kind), {})
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, tensor in own:
            key = f"{path}.{name}" if path else name
            if name not in rules:
                uncovered.append(f"{key} ({type(module).__name__})")
                continue
            collection, flax_name, to_flax, to_torch = rules[name]
            if path in flattened and name == "weight":
                chw = flattened[path]
                to_flax = functools.partial(conventions.flattened_linear_to_dense, chw=chw)
                to_torch = functools.partial(conventions.dense_to_flattened_linear, chw=chw)
            flax_key = "/".join([collection, *path.split("."), flax_name])
            moves.append(Move(key, flax_key, tuple(tensor.shape), to_flax, to_torch))
    if uncovered:
        raise NotImplementedError(f"no transfer rule for: {', '.join(uncovered)}")
    order = list(model.state_dict())
    return tuple(sorted(moves, key=lambda m: order.index(m.torch_key)))


@functools.lru_cache(maxsize=32)
def flax_template(spec: ModelSpec) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat Flax keys of ``spec`` with shapes and dtypes, from an abstract linen init."""
    model = spec.build_linen()
    x = jax.ShapeDtypeStruct((1, *spec.flax_input_shape), jnp.float32)  # abstract: nothing is allocated
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return dict(traverse_util.flatten_dict(variables, sep="/"))


def _flax_expected(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], str]]:
    """{flat Flax key: (shape, 'float' | 'int')} of ``spec``, for :func:`_validate`."""
    return {k: (tuple(v.shape), "int" if k.endswith(_COUNT) else "float") for k, v in flax_template(spec).items()}


# --- values -------------------------------------------------------------------------


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``_orig_mod.`` / ``module.`` (in any nesting) when every key carries it."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _kind(x: Any) -> str:
    """'float', 'int' or the dtype's name, for torch tensors and array-likes alike."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point:
            return "float"
        return "int" if not x.dtype.is_complex and x.dtype != torch.bool else str(x.dtype)
    dtype = np.asarray(x).dtype if not hasattr(x, "dtype") else np.dtype(x.dtype)
    if dtype.name == "bfloat16" or np.issubdtype(dtype, np.floating):
        return "float"
    return "int" if np.issubdtype(dtype, np.integer) else dtype.name


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _numpy(x: Any) -> np.ndarray:
    """float16/bfloat16 -> float32 (exact); torch and jax arrays -> numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    a = np.asarray(x)
    return a.astype(np.float32) if a.dtype.name in ("bfloat16", "float16") else a


def validate(
    given: Mapping[str, Any], expected: Mapping[str, tuple[tuple[int, ...], str]], allow_nonfinite: bool
) -> list[str]:
    """Every problem of ``given`` against ``expected`` = {key: (shape, dtype)}: keys, shapes,
    dtypes, non-finite values. dtype: a kind ('float', 'int') or an exact name ('float32')."""
    problems = [f"missing key '{k}' (expected shape {expected[k][0]})" for k in expected if k not in given]
    problems += [f"unexpected key '{k}' (shape {_shape(given[k])})" for k in given if k not in expected]
    for key, (shape, kind) in expected.items():
        if key not in given:
            continue
        value = given[key]
        got_shape, got_kind = _shape(value), _kind(value)
        if got_shape != shape:
            problems.append(f"shape mismatch at '{key}': expected {shape}, got {got_shape}")
        if kind not in ("float", "int"):
            got_dtype = str(getattr(value, "dtype", type(value).__name__))
            if got_dtype != kind:
                problems.append(f"dtype mismatch at '{key}': expected {kind}, got {got_dtype}")
            elif got_kind == "float" and not allow_nonfinite and not np.isfinite(_numpy(value)).all():
                problems.append(f"non-finite values at '{key}'")
            continue
        if got_kind != kind:
            want = "a floating-point" if kind == "float" else "an integer"
            problems.append(
                f"dtype mismatch at '{key}': expected {want} tensor, got {getattr(value, 'dtype', type(value))}"
            )
        elif kind == "float" and not allow_nonfinite:
            finite = np.isfinite(_numpy(value))
            if not finite.all():
                problems.append(
                    f"non-finite values at '{key}': {finite.size - int(finite.sum())} of {finite.size}"
                    " (pass allow_nonfinite=True to keep them)"
                )
        elif kind == "int" and got_shape == shape:
            n = int(_numpy(value))
            if not 0 <= n < 2**31:
                problems.append(f"'{key}' = {n} is outside [0, 2**31) and does not fit Flax's int32 counter")
    return problems


# --- torch <-> flat Flax ------------------------------------------------------------


def torch_to_flat(
    state_dict: Mapping[str, Any], spec: ModelSpec | str, *, allow_nonfinite: bool = False, float_dtype=np.float32
) -> FlatFlax:
    """A torch state_dict (tensors or numpy arrays) as flat Flax arrays, after validation.
    Floating tensors become ``float_dtype`` (float32; float64 for a float64 comparison)."""
    spec = get(spec)
    sd = strip_prefixes(state_dict)
    moves = plan(spec)
    expected = {m.torch_key: (m.torch_shape, "int" if m.is_count else "float") for m in moves}
    problems = validate(sd, expected, allow_nonfinite)
    if problems:
        raise TransferError(f"torch state_dict -> Flax '{spec.name}'", problems)
    flat = {}
    for m in moves:
        dtype = np.int32 if m.is_count else float_dtype
        # a copy: jnp.asarray may alias numpy memory on CPU, and numpy() aliases the tensor,
        # so without it a later in-place torch update would change the Flax weights too
        flat[m.flax_key] = np.array(m.to_flax(_numpy(sd[m.torch_key])), dtype=dtype, copy=True)
    return flat


def flat_to_torch(
    flat: Mapping[str, Any],
    spec: ModelSpec | str,
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
    spec = get(spec)
    expected = _flax_expected(spec)
    problems = validate(flat, expected, allow_nonfinite)
    if problems:
        raise TransferError(f"Flax variables -> torch '{spec.name}'", problems)
    sd = OrderedDict()
    for m in plan(spec):
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
        raise TransferError(what, problems)

    def dtype(key, var):
        return float_dtype if float_dtype is not None and not key.endswith(_COUNT) else var.get_value().dtype

    updates = [
        (path, var.replace(jnp.asarray(_numpy(flat[k]), dtype=dtype(k, var)))) for k, (path, var) in current.items()
    ]
    nnx.update(model, nnx.from_flat_state(updates))


# --- the public directions ------------------------------------------------------------


def _check_linen(flat: FlatFlax, spec: ModelSpec, what: str, allow_nonfinite: bool) -> None:
    expected = _flax_expected(spec)
    problems = validate(flat, expected, allow_nonfinite)
    if problems:
        raise TransferError(what, problems)


def torch_to_linen(
    state_dict: Mapping[str, Any], spec: ModelSpec | str, *, allow_nonfinite: bool = False, float_dtype=np.float32
) -> dict:
    """A torch state_dict as linen variables ``{"params", "batch_stats"}`` for ``spec``."""
    return flat_to_linen(torch_to_flat(state_dict, spec, allow_nonfinite=allow_nonfinite, float_dtype=float_dtype))


def linen_to_torch(variables: Mapping[str, Any], spec: ModelSpec | str, *, dtype=None, allow_nonfinite: bool = False):
    """Linen variables as a torch state_dict for ``spec`` (see :func:`flat_to_torch`)."""
    return flat_to_torch(linen_to_flat(variables), spec, dtype=dtype, allow_nonfinite=allow_nonfinite)


def torch_to_nnx(
    state_dict: Mapping[str, Any],
    spec: ModelSpec | str,
    model: nnx.Module | None = None,
    *,
    allow_nonfinite: bool = False,
    float_dtype=None,
) -> nnx.Module:
    """Load a torch state_dict into ``model`` (built from ``spec`` when None) and return it.
    Floats take the model's dtype (float32), or ``float_dtype`` when given."""
    spec = get(spec)
    flat = torch_to_flat(state_dict, spec, allow_nonfinite=allow_nonfinite, float_dtype=float_dtype or np.float32)
    model = spec.build_nnx(nnx.Rngs(NNX_SEED)) if model is None else model
    what = f"torch state_dict -> nnx '{spec.name}'"
    flat_into_nnx(model, flat, allow_nonfinite=allow_nonfinite, what=what, float_dtype=float_dtype)
    return model


def nnx_to_torch(model: nnx.Module, spec: ModelSpec | str, *, dtype=None, allow_nonfinite: bool = False):
    """An nnx model's parameters and statistics as a torch state_dict for ``spec``."""
    return flat_to_torch(nnx_to_flat(model), spec, dtype=dtype, allow_nonfinite=allow_nonfinite)


def linen_to_nnx(
    variables: Mapping[str, Any],
    spec: ModelSpec | str,
    model: nnx.Module | None = None,
    *,
    allow_nonfinite: bool = False,
) -> nnx.Module:
    """Load linen variables into an nnx model (built from ``spec`` when None)."""
    spec = get(spec)
    flat = linen_to_flat(variables)
    _check_linen(flat, spec, f"linen variables -> nnx '{spec.name}'", allow_nonfinite)
    model = spec.build_nnx(nnx.Rngs(NNX_SEED)) if model is None else model
    flat_into_nnx(model, flat, allow_nonfinite=allow_nonfinite, what=f"linen variables -> nnx '{spec.name}'")
    return model


def nnx_to_linen(model: nnx.Module, spec: ModelSpec | str, *, allow_nonfinite: bool = False) -> dict:
    """An nnx model's parameters and statistics as linen variables for ``spec``."""
    spec = get(spec)
    flat = nnx_to_flat(model)
    _check_linen(flat, spec, f"nnx -> linen '{spec.name}'", allow_nonfinite)
    return flat_to_linen(flat)
