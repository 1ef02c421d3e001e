"""The weight map: how each torch layer's tensors move to Flax and back (``LAYER_RULES``),
and the per-tensor plan of a model: a registry ``ModelSpec`` or any torch network built
from supported layers (:func:`custom`).

A layer's rule is found by its state layout, not by its exact type (:func:`rule_for`): a
subclass of a supported layer takes its parent's rule, every ``_BatchNorm`` (``BatchNorm1d``,
``BatchNorm2d``, ``SyncBatchNorm``, ...) the BatchNorm rule, and a *frozen* BatchNorm
(torchvision's ``FrozenBatchNorm2d``: ``weight``, ``bias``, ``running_mean`` and
``running_var`` as buffers, no counter) moves like a BatchNorm whose Flax counter is 0.
"""

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
from compare.transfer import flatten as flatten_detection
from compare.transfer.validation import CustomPortError

FlatFlax = dict[str, np.ndarray]  # "params/fc1/kernel" -> array
# An nnx model built here (``model=None``) gets nnx.Rngs(NNX_SEED): its weights are
# overwritten, its Dropout stream starts from this seed (pass ``model`` to choose).
NNX_SEED = 0
_COUNT = "num_batches_tracked"
Rule = dict[str, tuple[str, str, Callable, Callable]]  # torch name -> (collection, Flax name, to_flax, to_torch)


def _same(a: np.ndarray) -> np.ndarray:
    return a


_BATCHNORM: Rule = {
    "weight": ("params", "scale", _same, _same),
    "bias": ("params", "bias", _same, _same),
    "running_mean": ("batch_stats", "mean", _same, _same),
    "running_var": ("batch_stats", "var", _same, _same),
    _COUNT: ("batch_stats", _COUNT, _same, _same),
}
_NORM: Rule = {  # LayerNorm over the last axis, GroupNorm over channels: Flax's scale and bias
    "weight": ("params", "scale", _same, _same),
    "bias": ("params", "bias", _same, _same),
}
LAYER_RULES: dict[type, Rule] = {
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
    tnn.LayerNorm: _NORM,
    tnn.GroupNorm: _NORM,
}
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _is_frozen_batchnorm(module: tnn.Module) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` and its kind: the four BatchNorm tensors as
    buffers of one length, no parameters, no counter."""
    own = dict(module.named_buffers(recurse=False))
    if next(module.parameters(recurse=False), None) is not None or sorted(own) != sorted(_FROZEN_BUFFERS):
        return False
    return len({tuple(t.shape) for t in own.values()}) == 1 and own["weight"].dim() == 1


def rule_for(module: tnn.Module) -> tuple[Rule | None, str | None]:
    """The rule of ``module`` (None for a layer without one) and why a layer with tensors
    has none, or is refused although its type has a rule."""
    if isinstance(module, tnn.LayerNorm) and len(module.normalized_shape) > 1:
        return None, f"LayerNorm over {tuple(module.normalized_shape)}: only a normalised last axis ports"
    for kind in type(module).__mro__:  # the type itself, then its parents: subclasses port
        if kind in LAYER_RULES:
            return LAYER_RULES[kind], None
    if isinstance(module, tnn.modules.batchnorm._BatchNorm):  # SyncBatchNorm, BatchNorm3d, ...
        return _BATCHNORM, None
    if _is_frozen_batchnorm(module):
        return {k: _BATCHNORM[k] for k in _FROZEN_BUFFERS}, None
    return None, None


def supported_layers() -> str:
    """The layers with a rule, for error messages."""
    kinds = ", ".join(k.__name__ for k in LAYER_RULES)
    return f"{kinds}, their subclasses, SyncBatchNorm and frozen BatchNorm modules, and any layer without tensors"


@dataclasses.dataclass(frozen=True)
class Move:
    """How one torch tensor moves to Flax and back. ``flax_only``: a Flax counter with no
    torch tensor (a frozen BatchNorm's), 0 on the way in, dropped on the way back."""

    torch_key: str
    flax_key: str
    torch_shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    flax_only: bool = False

    @property
    def is_count(self) -> bool:
        return self.torch_key.endswith(_COUNT)


@dataclasses.dataclass(frozen=True, eq=False)
class Port:
    """Any torch network built from supported layers (:func:`rule_for`; layers without
    tensors need no rule) and a Flax twin with the same layer names, or with ``rename``
    (torch module path -> Flax module path, dots for nesting). ``flatten`` names each Linear
    that reads a flattened (C, H, W) map: its input features are permuted, (C, H, W) <->
    (H, W, C), for a twin that flattens channels-last; ``None`` says the twin flattens in
    torch's order. Use it wherever the transfer functions take a spec; build it with
    :func:`custom`, which checks all of this."""

    torch_model: tnn.Module
    flatten: Mapping[str, tuple[int, int, int] | None]
    rename: Mapping[str, str]
    name: str = "custom"


def _unsupported(model: tnn.Module) -> list[str]:
    """Every module with tensors of its own and no rule, with its path, type and tensors."""
    problems = []
    for path, module in model.named_modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if not own:
            continue
        rule, reason = rule_for(module)
        if rule is None:
            names = ", ".join(name for name, _ in own)
            problems.append(f"'{path}' ({type(module).__name__}, tensors {names}): {reason or 'no transfer rule'}")
        else:
            extra = [name for name, _ in own if name not in rule]
            if extra:
                problems.append(f"'{path}' ({type(module).__name__}): no rule for its tensor(s) {', '.join(extra)}")
    return problems


def custom(
    torch_model: tnn.Module,
    *,
    flatten: Mapping[str, tuple[int, int, int] | None] | None = None,
    rename: Mapping[str, str] | None = None,
    name: str = "custom",
    example_input: np.ndarray | torch.Tensor | None = None,
) -> Port:
    """The transfer spec of a network that is not in the registry (see :class:`Port`).

    Checked before anything is built, every problem listed in one
    :class:`~compare.transfer.CustomPortError`: paths that name no module, layers without
    a rule (with the supported set), and ``flatten``: each entry must name a Linear whose
    ``in_features`` is C*H*W, and each Linear that reads a flattened feature map (found by
    tracing the network with ``torch.fx``) must have an entry. With ``example_input`` (one
    batch in torch's layout) the traced shapes give the exact (C, H, W) to compare with;
    without it, a Linear after a global pooling needs no entry and any other flattened read
    must be declared. A network that ``torch.fx`` cannot trace gets a warning: its
    ``flatten`` is then checked for shape only.
    """
    flatten, rename = dict(flatten or {}), dict(rename or {})
    modules = dict(torch_model.named_modules())
    problems = [
        f"no module '{p}' in {type(torch_model).__name__} (named in flatten=)" for p in flatten if p not in modules
    ]
    problems += [
        f"no module '{p}' in {type(torch_model).__name__} (named in rename=)" for p in rename if p not in modules
    ]
    unsupported = _unsupported(torch_model)
    problems += unsupported
    for path, chw in flatten.items():
        if path in modules:
            problems += flatten_detection.entry_problems(path, modules[path], chw)
    problems += flatten_detection.graph_problems(torch_model, flatten, example_input)
    if problems:
        hint = f"supported: {supported_layers()}" if unsupported else None
        raise CustomPortError(f"transfer.custom({type(torch_model).__name__}, name='{name}')", problems, hint=hint)
    return Port(torch_model, flatten, rename, name)


def resolve(spec: ModelSpec | Port | str) -> ModelSpec | Port:
    """A registry name, a ModelSpec or a Port, as the object the functions here use."""
    return spec if isinstance(spec, Port) else get(spec)


def _flattened_inputs(spec: ModelSpec | Port) -> Mapping[str, tuple[int, int, int] | None]:
    """Linear layers that read a flattened (C, H, W) feature map with H*W > 1."""
    if isinstance(spec, Port):
        return spec.flatten
    return spec.config.flattened_linears()  # a ResNet flattens after global pooling: (C, 1, 1), nothing


@functools.lru_cache(maxsize=32)
def plan(spec: ModelSpec | Port) -> tuple[Move, ...]:
    """Every torch state_dict entry of ``spec`` with its Flax key and layout changes, in
    state_dict order (a frozen BatchNorm's Flax-only counter after its layer's tensors). A
    module with tensors but no rule is a :class:`~compare.transfer.CustomPortError` that
    names its path and type."""
    if isinstance(spec, Port):
        model = spec.torch_model
    else:
        with torch.device("meta"):
            model = spec.build_torch()
    unsupported = _unsupported(model)
    if unsupported:
        raise CustomPortError(
            f"no transfer rule in '{spec.name}'", unsupported, hint=f"supported: {supported_layers()}"
        )
    rename = spec.rename if isinstance(spec, Port) else {}
    flattened = _flattened_inputs(spec)
    order = {key: i for i, key in enumerate(model.state_dict())}
    moves = []
    for path, module in model.named_modules():
        rule, _ = rule_for(module)
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if rule is None or not own:
            continue
        flax_path = rename.get(path, path).split(".") if path else []
        for tensor_name, tensor in own:
            collection, flax_name, to_flax, to_torch = rule[tensor_name]
            if flattened.get(path) and tensor_name == "weight":
                chw = flattened[path]
                to_flax = functools.partial(conventions.flattened_linear_to_dense, chw=chw)
                to_torch = functools.partial(conventions.dense_to_flattened_linear, chw=chw)
            key = f"{path}.{tensor_name}" if path else tensor_name
            moves.append(
                Move(key, "/".join([collection, *flax_path, flax_name]), tuple(tensor.shape), to_flax, to_torch)
            )
        if _COUNT not in rule and "running_mean" in dict(own):  # a frozen BatchNorm: Flax keeps a counter
            key = f"{path}.{_COUNT}" if path else _COUNT
            moves.append(Move(key, "/".join(["batch_stats", *flax_path, _COUNT]), (), _same, _same, flax_only=True))
    last = {}  # a Flax-only counter sorts right after its layer's last tensor
    for m in moves:
        if not m.flax_only:
            last[m.torch_key.rsplit(".", 1)[0]] = order[m.torch_key]
    return tuple(
        sorted(moves, key=lambda m: last[m.torch_key.rsplit(".", 1)[0]] + 0.5 if m.flax_only else order[m.torch_key])
    )


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
