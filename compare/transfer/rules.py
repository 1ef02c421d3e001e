"""The weight map: how each torch layer type's tensors move to Flax and back
(``LAYER_RULES``), and the per-tensor plan of a model: a registry ``ModelSpec`` or any
torch network built from supported layers (:func:`custom`)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util
from torch import nn as tnn

from compare import conventions
from compare.registry import ModelSpec, get
from torchbn.config import CNNConfig

FlatFlax = dict[str, np.ndarray]  # "params/fc1/kernel" -> array
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
    tnn.Conv2d: {  # grouped too: (O, I/groups, kH, kW) <-> (kH, kW, I/groups, O), feature_group_count
        "weight": ("params", "kernel", conventions.oihw_to_hwio, conventions.hwio_to_oihw),
        "bias": ("params", "bias", _same, _same),
    },
    tnn.Conv1d: {
        "weight": ("params", "kernel", conventions.oiw_to_wio, conventions.wio_to_oiw),
        "bias": ("params", "bias", _same, _same),
    },
    tnn.BatchNorm1d: _BATCHNORM,
    tnn.BatchNorm2d: _BATCHNORM,
}


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


@dataclasses.dataclass(frozen=True, eq=False)
class Port:
    """Any torch network built from supported layers (``LAYER_RULES``: Linear, Conv1d,
    Conv2d with groups, BatchNorm1d/2d, and layers without parameters) and a Flax twin
    with the same layer names, or with ``rename`` (torch module path -> Flax module path,
    dots for nesting). ``flatten`` names each Linear that reads a flattened (C, H, W) map,
    whose input features are permuted, (C, H, W) <-> (H, W, C). Use it wherever the
    transfer functions take a spec; build it with :func:`custom`."""

    torch_model: tnn.Module
    flatten: Mapping[str, tuple[int, int, int]]
    rename: Mapping[str, str]
    name: str = "custom"


def custom(
    torch_model: tnn.Module,
    *,
    flatten: Mapping[str, tuple[int, int, int]] | None = None,
    rename: Mapping[str, str] | None = None,
    name: str = "custom",
) -> Port:
    """The transfer spec of a network that is not in the registry (see :class:`Port`)."""
    modules = dict(torch_model.named_modules())
    unknown = [p for p in [*(flatten or {}), *(rename or {})] if p not in modules]
    if unknown:
        raise KeyError(f"no module {', '.join(map(repr, unknown))} in {type(torch_model).__name__}")
    return Port(torch_model, dict(flatten or {}), dict(rename or {}), name)


def resolve(spec: ModelSpec | Port | str) -> ModelSpec | Port:
    """A registry name, a ModelSpec or a Port, as the object the functions here use."""
    return spec if isinstance(spec, Port) else get(spec)


def _flattened_inputs(spec: ModelSpec | Port) -> dict[str, tuple[int, int, int]]:
    """Linear layers that read a flattened (C, H, W) feature map with H*W > 1."""
    if isinstance(spec, Port):
        return dict(spec.flatten)
    if isinstance(spec.config, CNNConfig):
        return {"fc": spec.config.flatten_shape}
    return {}  # ResNet flattens after global pooling: (C, 1, 1), nothing to permute


@functools.lru_cache(maxsize=32)
def plan(spec: ModelSpec | Port) -> tuple[Move, ...]:
    """Every torch state_dict entry of ``spec`` with its Flax key and layout changes,
    in state_dict order. A module with parameters but no rule is an error that names its
    path and type."""
    if isinstance(spec, Port):
        model = spec.torch_model
    else:
        with torch.device("meta"):
            model = spec.build_torch()
    rename = spec.rename if isinstance(spec, Port) else {}
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
            flax_key = "/".join([collection, *rename.get(path, path).split("."), flax_name])
            moves.append(Move(key, flax_key, tuple(tensor.shape), to_flax, to_torch))
    if uncovered:
        rules = ", ".join(kind.__name__ for kind in LAYER_RULES)
        raise NotImplementedError(f"no transfer rule for: {', '.join(uncovered)} (rules exist for {rules})")
    order = list(model.state_dict())
    return tuple(sorted(moves, key=lambda m: order.index(m.torch_key)))


@functools.lru_cache(maxsize=32)
def flax_template(spec: ModelSpec | Port) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat Flax keys of ``spec`` with shapes and dtypes, from an abstract linen init."""
    if isinstance(spec, Port):  # the map itself says what the Flax side holds
        return {m.flax_key: _flax_struct(m) for m in plan(spec)}
    model = spec.build_linen()
    x = jax.ShapeDtypeStruct((1, *spec.flax_input_shape), jnp.float32)  # abstract: nothing is allocated
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return dict(traverse_util.flatten_dict(variables, sep="/"))


def _flax_struct(move: Move) -> jax.ShapeDtypeStruct:
    """The Flax shape of a torch tensor, from its layout change applied to a zero-stride
    stand-in (nothing of the tensor's size is allocated)."""
    stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), move.torch_shape, (0,) * len(move.torch_shape))
    dtype = jnp.int32 if move.is_count else jnp.float32
    return jax.ShapeDtypeStruct(np.shape(move.to_flax(stand_in)), dtype)


def flax_expected(spec: ModelSpec | Port) -> dict[str, tuple[tuple[int, ...], str]]:
    """{flat Flax key: (shape, 'float' | 'int')} of ``spec``, for ``validate``."""
    return {k: (tuple(v.shape), "int" if k.endswith(_COUNT) else "float") for k, v in flax_template(spec).items()}
