"""Every supported torch operation, in each form it comes in: a module, a function
(``torch.*``, ``torch.nn.functional.*``, ``operator.*``) or a tensor method. Each form
maps to one *kind* with one set of named arguments (the functional signature's names),
so one handler per kind serves every form. Anything not here is refused by name.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclasses.dataclass(frozen=True)
class Call:
    """One fx node as a kind with named arguments (fx nodes where values are computed)."""

    node: fx.Node
    kind: str
    form: str  # "module", "function" or "method"
    args: dict[str, Any]
    module: nn.Module | None = None

    @property
    def path(self) -> str:
        """The torch module path of a module call ("" otherwise)."""
        return str(self.node.target) if self.form == "module" else ""


@dataclasses.dataclass(frozen=True)
class Form:
    kind: str
    form: str
    target: Any  # module type, function, or method name
    signature: inspect.Signature | None  # functions and methods
    attrs: Callable[[nn.Module], dict] | None = None  # modules: the arguments, from the module
    fixed: tuple[tuple[str, Any], ...] = ()  # arguments the form implies (spatial rank, channel-wise)

    @property
    def name(self) -> str:
        """How a user writes it: ``Conv2d``, ``torch.nn.functional.conv2d``, ``Tensor.view``."""
        if self.form == "module":
            return self.target.__name__
        if self.form == "method":
            return f"Tensor.{self.target}"
        return function_name(self.target)


def function_name(fn: Callable) -> str:
    """A function as a user writes it: ``torch.nn.functional.conv2d``, ``operator.add``."""
    name = getattr(fn, "__name__", str(fn))
    for prefix, namespace in (("torch.nn.functional", F), ("torch", torch), ("operator", operator)):
        if getattr(namespace, name, None) is fn:
            return f"{prefix}.{name}"
    return f"{getattr(fn, '__module__', None) or 'builtins'}.{getattr(fn, '__qualname__', name)}"


def _sig(fn: Callable) -> inspect.Signature:
    return inspect.signature(fn)


def _attrs(*names: str, **renamed: str) -> Callable[[nn.Module], dict]:
    """The module's attributes as arguments: ``names`` as they are, ``renamed`` arg=attribute."""
    return lambda m: {**{n: getattr(m, n) for n in names}, **{a: getattr(m, n) for a, n in renamed.items()}}


FORMS: list[Form] = []


def _add(kind: str, *, modules=(), functions=(), methods=(), sig=None, attrs=None, **fixed) -> None:
    signature = _sig(sig) if sig else None
    fixed_items = tuple(fixed.items())
    FORMS.extend(Form(kind, "module", m, None, attrs, fixed_items) for m in modules)
    FORMS.extend(Form(kind, "function", f, signature, None, fixed_items) for f in functions)
    FORMS.extend(Form(kind, "method", m, signature, None, fixed_items) for m in methods)


# --- layers with parameters: module form, or a function given the module's own parameters ----
_CONV = _attrs("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_CONV_SIG = lambda input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1: None  # noqa: E731
_add("conv", modules=[nn.Conv1d], functions=[F.conv1d], sig=_CONV_SIG, attrs=_CONV, spatial=1)
_add("conv", modules=[nn.Conv2d], functions=[F.conv2d], sig=_CONV_SIG, attrs=_CONV, spatial=2)
_add("linear", modules=[nn.Linear], functions=[F.linear], sig=lambda input, weight, bias=None: None, attrs=_attrs())
_BN = _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")
_add("batch_norm", modules=[nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm], attrs=_BN)
_add(
    "layer_norm",
    modules=[nn.LayerNorm],
    functions=[F.layer_norm],
    sig=lambda input, normalized_shape, weight=None, bias=None, eps=1e-5: None,
    attrs=_attrs("normalized_shape", "eps"),
)
_add(
    "group_norm",
    modules=[nn.GroupNorm],
    functions=[F.group_norm],
    sig=lambda input, num_groups, weight=None, bias=None, eps=1e-5: None,
    attrs=_attrs("num_groups", "num_channels", "eps", "affine"),
)

# --- randomness: Flax's "dropout" stream in training, identity in eval ------------------------
_DROPOUT_SIG = lambda input, p=0.5, training=True, inplace=False: None  # noqa: E731
_add("dropout", modules=[nn.Dropout], functions=[F.dropout], sig=_DROPOUT_SIG, attrs=_attrs("p"), spatial=0)
_add("dropout", modules=[nn.Dropout1d], functions=[F.dropout1d], sig=_DROPOUT_SIG, attrs=_attrs("p"), spatial=1)
_add("dropout", modules=[nn.Dropout2d], functions=[F.dropout2d], sig=_DROPOUT_SIG, attrs=_attrs("p"), spatial=2)
_add("dropout", modules=[nn.Dropout3d], functions=[F.dropout3d], sig=_DROPOUT_SIG, attrs=_attrs("p"), spatial=3)
# torchvision.ops.stochastic_depth (fx.wrap'ed, so traced as a call; StochasticDepth calls it)
STOCHASTIC_DEPTH = Form(
    "stochastic_depth", "function", "stochastic_depth", _sig(lambda input, p, mode, training=True: None)
)

# --- activations ---------------------------------------------------------------------------------
_INPUT = lambda input, inplace=False: None  # noqa: E731
_add(
    "relu",
    modules=[nn.ReLU],
    functions=[F.relu, torch.relu, torch.relu_, F.relu_],
    methods=["relu", "relu_"],
    sig=_INPUT,
    attrs=_attrs(),
)
_add("relu6", modules=[nn.ReLU6], functions=[F.relu6], sig=_INPUT, attrs=_attrs())
_add("silu", modules=[nn.SiLU], functions=[F.silu], sig=_INPUT, attrs=_attrs())
_add(
    "gelu",
    modules=[nn.GELU],
    functions=[F.gelu],
    sig=lambda input, approximate="none": None,
    attrs=_attrs("approximate"),
)
_add("hardswish", modules=[nn.Hardswish], functions=[F.hardswish], sig=_INPUT, attrs=_attrs())
_add("hardsigmoid", modules=[nn.Hardsigmoid], functions=[F.hardsigmoid], sig=_INPUT, attrs=_attrs())
_add(
    "sigmoid",
    modules=[nn.Sigmoid],
    functions=[torch.sigmoid, F.sigmoid],
    methods=["sigmoid", "sigmoid_"],
    sig=_INPUT,
    attrs=_attrs(),
)
_add("tanh", modules=[nn.Tanh], functions=[torch.tanh, F.tanh], methods=["tanh", "tanh_"], sig=_INPUT, attrs=_attrs())
_add(
    "leaky_relu",
    modules=[nn.LeakyReLU],
    functions=[F.leaky_relu, F.leaky_relu_],
    sig=lambda input, negative_slope=0.01, inplace=False: None,
    attrs=_attrs("negative_slope"),
)
_add(
    "identity",
    modules=[nn.Identity],
    methods=["contiguous", "clone"],
    sig=lambda input, *args, **kwargs: None,
    attrs=_attrs(),
)

# --- pooling ---------------------------------------------------------------------------------------
_MAX = _attrs("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_MAX_SIG = lambda input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False: None  # noqa: E731
_add("max_pool", modules=[nn.MaxPool1d], functions=[F.max_pool1d], sig=_MAX_SIG, attrs=_MAX, spatial=1)
_add("max_pool", modules=[nn.MaxPool2d], functions=[F.max_pool2d], sig=_MAX_SIG, attrs=_MAX, spatial=2)
_AVG = _attrs("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_add(
    "avg_pool",
    modules=[nn.AvgPool1d],
    functions=[F.avg_pool1d],
    sig=lambda input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True: None,
    attrs=_AVG,
    spatial=1,
)
_add(
    "avg_pool",
    modules=[nn.AvgPool2d],
    functions=[F.avg_pool2d],
    sig=lambda input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None: (
        None
    ),
    attrs=_attrs("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    spatial=2,
)
_OUT = lambda input, output_size, return_indices=False: None  # noqa: E731
_add(
    "adaptive_avg_pool",
    modules=[nn.AdaptiveAvgPool1d],
    functions=[F.adaptive_avg_pool1d],
    sig=_OUT,
    attrs=_attrs("output_size"),
    spatial=1,
)
_add(
    "adaptive_avg_pool",
    modules=[nn.AdaptiveAvgPool2d],
    functions=[F.adaptive_avg_pool2d],
    sig=_OUT,
    attrs=_attrs("output_size"),
    spatial=2,
)
_add(
    "adaptive_max_pool",
    modules=[nn.AdaptiveMaxPool1d],
    functions=[F.adaptive_max_pool1d],
    sig=_OUT,
    attrs=_attrs("output_size", "return_indices"),
    spatial=1,
)
_add(
    "adaptive_max_pool",
    modules=[nn.AdaptiveMaxPool2d],
    functions=[F.adaptive_max_pool2d],
    sig=_OUT,
    attrs=_attrs("output_size", "return_indices"),
    spatial=2,
)

# --- shapes and structure ------------------------------------------------------------------------
_add(
    "flatten",
    modules=[nn.Flatten],
    functions=[torch.flatten],
    methods=["flatten"],
    sig=lambda input, start_dim=0, end_dim=-1: None,
    attrs=_attrs("start_dim", "end_dim"),
)
_add("reshape", methods=["view", "reshape"], sig=lambda input, *shape: None)
_add("reshape", functions=[torch.reshape], sig=lambda input, shape: None)
_add("permute", methods=["permute"], sig=lambda input, *dims: None)
_add("permute", functions=[torch.permute], sig=lambda input, dims: None)
_add("transpose", functions=[torch.transpose], methods=["transpose"], sig=lambda input, dim0, dim1: None)
_add("size", methods=["size"], sig=lambda input, dim=None: None)
_add("mean", functions=[torch.mean], methods=["mean"], sig=lambda input, dim=None, keepdim=False, dtype=None: None)
_add("cat", functions=[torch.cat, torch.concat, torch.concatenate], sig=lambda tensors, dim=0: None)
_add("stack", functions=[torch.stack], sig=lambda tensors, dim=0: None)
_add("chunk", functions=[torch.chunk], methods=["chunk"], sig=lambda input, chunks, dim=0: None)
_add("split", functions=[torch.split], methods=["split"], sig=lambda input, split_size_or_sections, dim=0: None)
_add("getitem", functions=[operator.getitem], sig=lambda input, index: None)
_add("getattr", functions=[getattr], sig=lambda input, name: None)

# --- arithmetic: tensors (broadcasting, any layout) and Python ints (shape arithmetic) -------------
_BINARY = lambda input, other, alpha=1: None  # noqa: E731
_add("add", functions=[operator.add, torch.add], methods=["add", "add_"], sig=_BINARY)
_add("sub", functions=[operator.sub, torch.sub], methods=["sub", "sub_"], sig=_BINARY)
_add("mul", functions=[operator.mul, torch.mul], methods=["mul", "mul_"], sig=lambda input, other: None)
_add(
    "truediv",
    functions=[operator.truediv, torch.div],
    methods=["div", "div_"],
    sig=lambda input, other, rounding_mode=None: None,
)
_add("floordiv", functions=[operator.floordiv], sig=lambda input, other: None)
_add("neg", functions=[operator.neg, torch.neg], methods=["neg"], sig=lambda input: None)

_MODULES = [f for f in FORMS if f.form == "module"]
_FUNCTIONS = {f.target: f for f in FORMS if f.form == "function"}
_METHODS = {f.target: f for f in FORMS if f.form == "method"}
KINDS = sorted({f.kind for f in FORMS} | {STOCHASTIC_DEPTH.kind})


def module_form(m: nn.Module) -> Form | None:
    """The form of a module: its exact type, or a subclass that keeps the forward of a
    supported type (and so computes the same; a subclass with its own forward is traced
    into). ``SyncBatchNorm`` is BatchNorm outside a distributed run."""
    for f in _MODULES:
        if type(m) is f.target:
            return f
    for f in _MODULES:
        if isinstance(m, f.target) and type(m).forward is f.target.forward:
            return f
    return None


def lookup(node: fx.Node, modules: dict[str, nn.Module]) -> Call | None:
    """The call an fx node makes, or None when it is not supported. Raises TypeError when
    the arguments do not bind to the form's signature."""
    if node.op == "call_module":
        module = modules[node.target]
        f = module_form(module)
        if f is None:
            return None
        return Call(node, f.kind, "module", {"input": node.args[0], **f.attrs(module), **dict(f.fixed)}, module)
    if node.op == "call_function":
        f = _FUNCTIONS.get(node.target)
        if f is None and getattr(node.target, "__name__", "") == STOCHASTIC_DEPTH.target:
            f = STOCHASTIC_DEPTH
    elif node.op == "call_method":
        f = _METHODS.get(node.target)
    else:
        return None
    if f is None:
        return None
    bound = f.signature.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    return Call(node, f.kind, f.form, {**bound.arguments, **dict(f.fixed)})


def supported() -> dict[str, list[str]]:
    """The supported set by form, for error messages and the documentation."""
    out: dict[str, list[str]] = {"module": [], "function": [], "method": []}
    for f in [*FORMS, STOCHASTIC_DEPTH]:
        name = "torchvision.ops.stochastic_depth" if f is STOCHASTIC_DEPTH else f.name
        if name not in out[f.form]:
            out[f.form].append(name)
    return {k: sorted(v) for k, v in out.items()}
