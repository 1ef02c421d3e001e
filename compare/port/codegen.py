"""Flax source from the fx traces: one line per node, each layer declared once.

The same walk writes linen (layers in ``setup``, nested in ``flaxbn.ported.Tree`` under
torch's names; ``train`` an argument) and NNX (layers in ``__init__``, nested in
``nnx.Dict``; the mode is ``model.train()`` / ``model.eval()``). When the two traces have
the same structure (the usual case: the mode only decides what BatchNorm and the random
layers do) there is one forward; otherwise one per mode, chosen by the mode.
"""

from __future__ import annotations

import dataclasses
import functools
import keyword
from typing import Any

import numpy as np
from torch import fx, nn

from compare.port import ops, render
from compare.port.layout import Layout
from compare.port.ops.emitter import Emitter
from compare.port.ops.table import function_name
from compare.port.ops.values import SeqValue, Site, TensorValue, Unsupported, flax_path
from compare.port.trace import PortError, TensorInfo, Traced
from compare.transfer import Move


@dataclasses.dataclass
class Generated:
    source: str
    class_name: str
    api: str
    moves: list[Move]
    sites: list[Site]
    input_layout: Layout
    outputs: dict[str, Any]  # per mode ("eval", "train"): Layout for a tensor, None for a Python value
    conversions: int  # transposes in the generated forward(s)
    split: bool  # one forward per mode


class Generator:
    """Writes one Flax module for an API from the eval and train traces."""

    def __init__(self, model: nn.Module, api: str):
        if api not in ("linen", "nnx"):
            raise ValueError(f"api must be 'linen' or 'nnx', got {api!r}")
        self.model, self.api = model, api
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.parameters = {k for k, _ in model.named_parameters()}
        self.children = {name for name, _ in model.named_children()}
        self.tree: dict[str, Any] = {}  # nested: name -> dict, ("layer", linen, nnx) or ("param", shape)
        self.moves: dict[str, Move] = {}
        self.conversions = 0
        self.problems: list[str] = []
        self.refused: set[str] = set()  # nodes without a value: refused, or fed by a refused one
        self.sites: list[Site] = []

    def declare(self, path: str, linen: str, nnx: str) -> str:
        """Declare the layer at torch path ``path`` (once) and return the expression that reaches it."""
        path = flax_path(path)
        self._place(path, ("layer", linen, nnx))
        return self.access(path)

    def declare_param(self, owner: str, name: str, shape: tuple[int, ...]) -> str:
        key = f"{owner}.{name}" if owner else name
        path = flax_path(key)
        self._place(path, ("param", shape))
        self.move(key, "/".join(["params", *path.split(".")]), _same, _same)
        return self.access(path)

    def _place(self, path: str, entry: tuple) -> None:
        *parents, name = path.split(".")
        level = self.tree
        for part in parents:
            level = level.setdefault(part, {})
            if not isinstance(level, dict):
                raise Unsupported(f"{path!r} is inside a layer")
        if name in level and level[name] != entry:
            raise Unsupported(f"the layer {path!r} is called with different settings")
        level[name] = entry

    @staticmethod
    def access(path: str) -> str:
        first, *rest = path.split(".")
        head = f"self.{first}" if first.isidentifier() and not keyword.iskeyword(first) else f'getattr(self, "{first}")'
        return head + "".join(f'["{p}"]' for p in rest)

    def move(self, torch_key: str, flax_key: str, to_flax, to_torch) -> None:
        if torch_key not in self.shapes:
            raise Unsupported(f"{torch_key!r} is not in the model's state_dict")
        move = Move(torch_key, flax_key, self.shapes[torch_key], to_flax, to_torch)
        old = self.moves.get(torch_key)
        if old is not None and (old.flax_key, _same_map(old.to_flax)) != (flax_key, _same_map(to_flax)):
            raise Unsupported(f"{torch_key!r} is used in two ways (as {old.flax_key} and as {flax_key})")
        self.moves[torch_key] = move

    # --- one forward --------------------------------------------------------------------------------

    def forward(self, traced: Traced, train: str, input_layout: Layout) -> tuple[list[str], Any]:
        e = Emitter(self, traced, train)
        outputs = None
        for node in traced.nodes:
            e.node = node
            if node.op == "placeholder":
                info = traced.example[node.name]
                if not isinstance(info, TensorInfo):
                    raise PortError(f"the input {node.name!r} is not a tensor ({info!r}); port takes one tensor input")
                name = e.fresh(node.name)
                e.values[node.name] = TensorValue(name, input_layout, tuple(info.shape), info.dtype)
                continue
            if node.op == "get_attr":
                continue  # read where it is used: as a layer's weight, or as a value (_raw_param)
            if node.op == "output":
                outputs = self._output(e, node.args[0])
                continue
            self._node(e, node)
        return e.lines, outputs

    def _node(self, e: Emitter, node: fx.Node) -> None:
        """One node's line, or its problem; a node that only fails because an argument
        was refused is not listed again."""
        where = e.traced.where[node.name]
        if node.op == "call_module":  # the description names the module already
            where = f"({where.source})" if where.source else ""
        try:
            call = ops.lookup(node, e.modules)
        except TypeError as err:
            self._refuse(node, f"{_describe(node, e.modules)}: arguments do not bind ({err}) {where}")
            return
        if call is None:
            self._refuse(node, f"{_describe(node, e.modules)} {where}".rstrip())
            return
        try:
            ops.HANDLERS[call.kind](e, call)
        except Unsupported as err:
            self._refuse(node, f"{_describe(node, e.modules)}: {err} {where}")
        except KeyError as err:
            if err.args[0] not in self.refused:
                raise
            self.refused.add(node.name)

    def _refuse(self, node: fx.Node, problem: str) -> None:
        self.refused.add(node.name)
        self.problems.append(problem)

    def _output(self, e: Emitter, out: Any) -> Any:
        """The return line, and the output structure (layouts of tensors, None for Python)."""
        try:
            structure, expr = _returned(e, out)
        except KeyError:  # a value a refused node would have made
            if not self.problems:
                raise
            return None
        e.lines.append(f"return {expr}")
        return structure


def _returned(e: Emitter, a: Any) -> tuple[Any, str]:
    """(structure, expression) of what forward returns: tensors, Python values, and
    tuples, lists and dicts of them."""
    v = e.value(a) if isinstance(a, fx.Node) else a
    if isinstance(v, TensorValue):
        return v.layout, v.name
    if isinstance(v, SeqValue):
        return tuple(_returned(e, item)[0] for item in v.items), v.name
    if isinstance(v, (list, tuple)):
        parts = [_returned(e, x) for x in v]
        inner = ", ".join(p[1] for p in parts) + ("," if isinstance(v, tuple) and len(v) == 1 else "")
        return type(v)(p[0] for p in parts), f"[{inner}]" if isinstance(v, list) else f"({inner})"
    if isinstance(v, dict):
        parts = {k: _returned(e, x) for k, x in v.items()}
        return {k: p[0] for k, p in parts.items()}, "{" + ", ".join(f"{k!r}: {p[1]}" for k, p in parts.items()) + "}"
    return None, e.py_of(v)


def _same_map(fn) -> tuple:
    """A layout change, comparable: a ``functools.partial`` by its function and arguments."""
    return (fn.func, fn.args, tuple(sorted(fn.keywords.items()))) if isinstance(fn, functools.partial) else (fn,)


def _same(a: np.ndarray) -> np.ndarray:
    return a  # a parameter used as a value moves as it is


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {type(modules[node.target]).__name__} at {node.target!r}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"function {function_name(node.target)}"


# --- the whole module ---------------------------------------------------------------------------------

_CHANNELS_LAST = {"conv", "batch_norm", "group_norm", "max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"}
_LAST_AXIS = {"linear", "layer_norm"}


def _input_layout(traced: Traced, modules: dict[str, nn.Module]) -> Layout:
    """Channels last for an image-like input unless it goes straight into a Linear or a LayerNorm."""
    node = next(n for n in traced.nodes if n.op == "placeholder")
    ndim = len(traced.example[node.name].shape)
    kinds = set()
    for user in node.users:
        try:
            call = ops.lookup(user, modules)
        except TypeError:
            call = None
        kinds.add(call.kind if call else None)
    if kinds & _LAST_AXIS and not kinds & _CHANNELS_LAST:
        return Layout.identity(ndim)
    return Layout.channels_last(ndim)


def _mode_free(traced: Traced, modules: dict[str, nn.Module]) -> list:
    """Each node as (op, target, arguments) with nodes as indices, and the ``training``
    argument of the random functions left out (the generated layers follow the mode)."""
    index = {n: i for i, n in enumerate(traced.nodes)}

    def norm(a):
        if isinstance(a, fx.Node):
            return ("node", index[a])
        if isinstance(a, (list, tuple)):
            return type(a)(norm(x) for x in a)
        if isinstance(a, dict):
            return {k: norm(v) for k, v in a.items()}
        return a

    out = []
    for n in traced.nodes:
        args = {"args": n.args, **n.kwargs}
        try:
            call = ops.lookup(n, modules)
        except TypeError:
            call = None
        if call is not None and call.kind in ("dropout", "stochastic_depth") and call.form == "function":
            args = {k: v for k, v in call.args.items() if k != "training"}
            args["mode"] = (traced.mode == "train") == bool(call.args["training"])  # follows the mode, or not
        out.append((n.op, n.target, norm(args)))
    return out


def generate(model: nn.Module, traced_eval: Traced, traced_train: Traced, api: str, class_name: str) -> Generated:
    """The Flax module for ``api`` of the two traces; PortError lists every unsupported node."""
    gen = Generator(model, api)
    modules = dict(traced_train.gm.named_modules())
    split = _mode_free(traced_eval, dict(traced_eval.gm.named_modules())) != _mode_free(traced_train, modules)
    input_layout = _input_layout(traced_train, modules)
    if split:
        bodies = {
            "forward_eval": gen.forward(traced_eval, "False", input_layout),
            "forward_train": gen.forward(traced_train, "True", input_layout),
        }
    else:
        bodies = {"__call__": gen.forward(traced_train, "train", input_layout)}
    if gen.problems:
        table = ops.supported()
        listing = "\n".join(f"  - {p}" for p in gen.problems)
        raise PortError(
            f"{type(model).__name__}: {len(gen.problems)} node(s) cannot be ported:\n{listing}\n"
            f"Supported modules: {', '.join(table['module'])}\n"
            f"Supported functions: {', '.join(table['function'])}\n"
            f"Supported tensor methods: {', '.join(table['method'])}"
        )
    outputs = {mode: bodies[f"forward_{mode}" if split else "__call__"][1] for mode in ("eval", "train")}
    placeholder = next(n for n in traced_train.nodes if n.op == "placeholder").name
    source = render.module(gen.tree, api, model, class_name, placeholder, bodies, split, input_layout, outputs)
    order = {k: i for i, k in enumerate(model.state_dict())}  # the moves in state_dict order, as transfer.plan's
    moves = sorted(gen.moves.values(), key=lambda m: order[m.torch_key])
    return Generated(source, class_name, api, moves, gen.sites, input_layout, outputs, gen.conversions, split)
