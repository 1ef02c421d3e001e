"""Which Linear layers read a flattened feature map: the one place where torch's
channel-major order (C, H, W) and Flax's channel-minor order (H, W, C) meet a weight.

A twin that flattens NHWC activations (``x.reshape(len(x), -1)``) needs that Linear's input
features permuted (``flatten={"head": (C, H, W)}`` in :func:`compare.transfer.custom`); a
missing entry gives logits that are silently wrong (0.155 off on a VGG), a wrong one a
permutation of the wrong size. So the network is traced with ``torch.fx``: every Linear
whose input comes from ``torch.flatten``, ``nn.Flatten``, ``.flatten()``, ``.view()`` or
``.reshape()`` (through layers that keep the shape, such as ReLU and Dropout) is found, with
the source line fx recorded; an example input gives the exact shape of the map.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.fx
from torch import nn as tnn
from torch.fx.passes.shape_prop import ShapeProp

_SAME_SHAPE_MODULES = (
    tnn.ReLU,
    tnn.ReLU6,
    tnn.LeakyReLU,
    tnn.GELU,
    tnn.SiLU,
    tnn.Sigmoid,
    tnn.Tanh,
    tnn.Hardswish,
    tnn.Hardsigmoid,
    tnn.Identity,
    tnn.modules.dropout._DropoutNd,
)
_SAME_SHAPE_FUNCTIONS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.dropout,
    torch.dropout,
}
_SAME_SHAPE_METHODS = {"relu", "contiguous", "clone", "sigmoid", "tanh"}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}


@dataclasses.dataclass(frozen=True)
class FlattenedRead:
    """A Linear whose input is a flattened tensor."""

    layer: str  # the Linear's module path
    source: str  # the flatten, as fx recorded it: "torch.flatten at net.py:17"
    chw: tuple[int, int, int] | None  # the map's (C, H, W) from the example input's shapes; (C, 1, W) for 1-D
    rank: int | None  # the flattened tensor's rank (2: nothing was flattened but the features)
    channels: tuple[str, int] | None  # the layer that made the map and its channel count
    global_pool: bool  # the map went through a pooling to 1x1 (or a mean over the spatial axes)


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')
_TORCH_DIR = os.path.dirname(torch.__file__)


def user_line(node: torch.fx.Node) -> str | None:
    """The user's source line that made ``node`` ("net.py:17 in forward"), from the stack
    fx recorded, torch's own frames left out; None when fx recorded none."""
    frames = [m for m in _FRAME.finditer(node.stack_trace or "") if not m["file"].startswith(_TORCH_DIR)]
    if not frames:
        return None
    last = frames[-1]
    return f"{os.path.basename(last['file'])}:{last['line']} in {last['func']}"


def _source(node: torch.fx.Node) -> str:
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    kind = {"call_method": f".{what}()", "call_module": f"module '{what}'"}.get(node.op, f"torch.{what}")
    where = user_line(node)
    return f"{kind} at {where}" if where else kind


def _is_same_shape(node: torch.fx.Node, modules: Mapping[str, tnn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _SAME_SHAPE_MODULES)
    if node.op == "call_function":
        return node.target in _SAME_SHAPE_FUNCTIONS
    return node.op == "call_method" and node.target in _SAME_SHAPE_METHODS


def _is_flatten(node: torch.fx.Node, modules: Mapping[str, tnn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], tnn.Flatten)
    if node.op == "call_function":
        return node.target in (torch.flatten, torch.reshape)
    return node.op == "call_method" and node.target in _FLATTEN_METHODS


def _is_global_pool(node: torch.fx.Node, modules: Mapping[str, tnn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (tnn.AdaptiveAvgPool1d, tnn.AdaptiveAvgPool2d, tnn.AdaptiveMaxPool1d, tnn.AdaptiveMaxPool2d)):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,)
            return all(s == 1 for s in size)
        return False
    if node.op == "call_function" and "adaptive" in getattr(node.target, "__name__", ""):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))
    if (node.op, node.target) in (("call_method", "mean"), ("call_function", torch.mean)):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return {d % 4 if isinstance(d, int) else d for d in dims} >= {2, 3}
    return False


def _producer(node: torch.fx.Node, modules: Mapping[str, tnn.Module]) -> tuple[tuple[str, int] | None, bool]:
    """The nearest layer upstream that states its output channels, and whether a global
    pooling lies between it and ``node``."""
    pooled = False
    while isinstance(node, torch.fx.Node) and node.op != "placeholder":
        pooled = pooled or _is_global_pool(node, modules)
        if node.op == "call_module":
            m = modules[node.target]
            channels = getattr(m, "out_channels", None) or getattr(m, "num_features", None)
            channels = channels or getattr(m, "num_channels", None)
            if isinstance(channels, int):
                return (node.target, channels), pooled
        if not node.args or not isinstance(node.args[0], torch.fx.Node):
            break
        node = node.args[0]
    return None, pooled


def _trace(model: tnn.Module) -> torch.fx.GraphModule:
    tracer = torch.fx.Tracer()
    tracer.record_stack_traces = True
    return torch.fx.GraphModule(model, tracer.trace(model))


def flattened_reads(model: tnn.Module, example_input=None) -> list[FlattenedRead]:
    """Every Linear of ``model`` that reads a flattened tensor. Traced in eval mode (the
    modes are restored; nothing is updated); ``example_input`` (torch layout) adds shapes.
    Raises whatever ``torch.fx`` raises for a network it cannot trace."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        gm = _trace(model)
        if example_input is not None:
            x = (
                example_input
                if isinstance(example_input, torch.Tensor)
                else torch.from_numpy(np.asarray(example_input))
            )
            with torch.no_grad():
                ShapeProp(gm).propagate(x.to(next(model.parameters(), torch.empty(0)).device))
    finally:
        for m, training in modes.items():
            m.training = training
    modules = dict(gm.named_modules())
    reads = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], tnn.Linear):
            continue
        src = node.args[0] if node.args else None
        while isinstance(src, torch.fx.Node) and _is_same_shape(src, modules):
            src = src.args[0]
        if not (isinstance(src, torch.fx.Node) and _is_flatten(src, modules)):
            continue
        flat_in = src.args[0]
        meta = flat_in.meta.get("tensor_meta") if isinstance(flat_in, torch.fx.Node) else None
        shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        chw = None
        if shape is not None and len(shape) in (3, 4):
            chw = (shape[1], 1, shape[2]) if len(shape) == 3 else tuple(shape[1:])
        channels, pooled = _producer(flat_in, modules)
        reads.append(FlattenedRead(node.target, _source(src), chw, len(shape) if shape else None, channels, pooled))
    return reads


def entry_problems(path: str, module: tnn.Module, chw) -> list[str]:
    """What is wrong with one ``flatten=`` entry on its own."""
    if not isinstance(module, tnn.Linear):
        return [f"flatten['{path}']: '{path}' is a {type(module).__name__}, not a Linear"]
    if chw is None:
        return []
    if not (isinstance(chw, tuple) and len(chw) == 3 and all(isinstance(v, int) and v >= 1 for v in chw)):
        return [f"flatten['{path}'] = {chw!r}: expected (C, H, W), three ints >= 1 ((C, 1, W) for a 1-D map), or None"]
    if int(np.prod(chw)) != module.in_features:
        return [
            f"flatten['{path}'] = {chw}: C*H*W = {int(np.prod(chw))}, but '{path}' has in_features = {module.in_features}"
        ]
    return []


def _read_problems(read: FlattenedRead, flatten: Mapping) -> list[str]:
    layer, given = read.layer, flatten.get(read.layer, ...)
    if read.rank == 2:  # a (N, F) tensor "flattened": nothing to permute
        return []
    if given is None:  # declared: the twin flattens in torch's order
        return []
    if given is ...:
        if read.global_pool or (read.chw is not None and read.chw[1] * read.chw[2] == 1):
            return []  # a (C, 1, 1) map: the orders agree
        if read.chw is not None:
            return [
                f"'{layer}' (Linear) reads {read.source} of a (C, H, W) = {read.chw} map: pass "
                f"flatten={{'{layer}': {read.chw}}} for a twin that flattens channels-last (x.reshape(len(x), -1) "
                f"on NHWC), or flatten={{'{layer}': None}} for one that flattens in torch's order"
            ]
        hint = f"C = {read.channels[1]} from '{read.channels[0]}'" if read.channels else "C, H, W of that map"
        return [
            f"'{layer}' (Linear) reads {read.source} of a feature map: pass flatten={{'{layer}': (C, H, W)}} ({hint}) "
            f"or flatten={{'{layer}': None}}, or example_input= so that its shape is traced"
        ]
    if read.chw is not None and tuple(given) != read.chw:
        return [f"flatten['{layer}'] = {tuple(given)}, but '{layer}' reads {read.source} of a {read.chw} map"]
    if read.chw is None and read.channels and given[0] != read.channels[1]:
        ch_layer, c = read.channels
        return [f"flatten['{layer}'] = {tuple(given)}, but the map it reads has {c} channels (from '{ch_layer}')"]
    return []


def graph_problems(model: tnn.Module, flatten: Mapping, example_input=None) -> list[str]:
    """Every Linear that reads a flattened map without a fitting ``flatten`` entry, and
    every entry whose Linear reads no flattened map. A network ``torch.fx`` cannot trace is
    warned about, not refused."""
    try:
        reads = flattened_reads(model, example_input)
    except Exception as e:  # fx refuses data-dependent control flow and some builtins
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {str(e).splitlines()[0]}): "
            "the flatten= entries are checked for size only; a Linear after a flatten that is not listed goes unseen",
            stacklevel=3,
        )
        return []
    problems = [p for read in reads for p in _read_problems(read, flatten)]
    read_layers = {r.layer for r in reads}
    problems += [
        f"flatten['{layer}'] is given, but '{layer}' does not read a flattened tensor (traced with torch.fx)"
        for layer in flatten
        if layer not in read_layers and flatten[layer] is not None
    ]
    return problems
