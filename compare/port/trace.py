"""The torch side of a port: one ``torch.fx`` trace per mode, with what each node is.

fx records the Python code that ran, so ``self.training`` is baked into a trace
(``F.dropout(x, p, self.training)`` becomes ``training=True`` or ``False``, and modules
that branch on the mode give two different graphs): the network is traced in eval mode
and in train mode, and each trace is run once on the example input to record every
node's value (tensor shapes and dtypes; the ints that ``size()`` gives). Two more things
are settled here, before any Flax code is written:

* in-place operations (``relu_``, ``ReLU(inplace=True)``, ``x.add_(y)``): fx keeps reading
  the mutated node afterwards, so every later use of it is redirected to the in-place
  node's result; an in-place change of a *view* whose base is used later is refused;
* where each node comes from: its torch module path and the user's source line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import fx, nn

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)(?:\n[ \t]+(?P<code>(?!File )[^\n]*))?')
# ops whose result shares memory with their first argument (an in-place change of it changes the base)
_VIEWS = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "flatten",
    "contiguous",
    "expand",
    "squeeze",
    "unsqueeze",
    "narrow",
    "getitem",
    "chunk",
    "split",
}


class PortError(ValueError):
    """A network that cannot be ported as it is; the message lists every reason at once."""


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Where:
    """Where a node comes from: its torch module path and the user's source line."""

    module: str  # "" for the network itself
    source: str  # "file.py:12: x = self.conv(x)", or "" when fx recorded none

    def __str__(self) -> str:
        at = f"in {self.module!r}" if self.module else "in the network's forward"
        return f"{at}{f' ({self.source})' if self.source else ''}"


@dataclasses.dataclass
class Traced:
    """One mode's trace: the graph (in-place uses resolved), each node's example value
    (``TensorInfo``, a Python value, or a tuple/list of them) and where it comes from."""

    mode: str
    gm: fx.GraphModule
    example: dict[str, Any]
    where: dict[str, Where]

    @property
    def nodes(self) -> list[fx.Node]:
        return list(self.gm.graph.nodes)


class _Tracer(fx.Tracer):
    def __init__(self, is_leaf: Callable[[nn.Module], bool]):
        super().__init__()
        self.record_stack_traces = True
        self._is_leaf = is_leaf

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._is_leaf(m) or super().is_leaf_module(m, qualname)


def _source(stack_trace: str | None) -> str:
    """The innermost frame of the user's code (not torch's own) in fx's stack trace."""
    frames = [m for m in _FRAME.finditer(stack_trace or "") if not m["file"].startswith(_TORCH_DIR)]
    if not frames:
        return ""
    f = frames[-1]
    code = f": {f['code'].strip()}" if f["code"] else ""
    return f"{os.path.basename(f['file'])}:{f['line']}{code}"


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _summary(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return TensorInfo(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return tuple(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_summary(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"<{type(value).__name__}>"


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.example: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.example[n.name] = _summary(out)
        return out


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Runs inside leave the model's mode, buffers (BatchNorm statistics) and torch's
    global random state as they were."""
    training = model.training
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    rng = torch.random.get_rng_state()
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        torch.random.set_rng_state(rng)
        model.train(training)


def is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` changes its first argument in place."""
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("__") and getattr(node.target, "__module__", "") != "_operator":
            return True
        if node.kwargs.get("inplace"):
            return True
        with contextlib.suppress(TypeError, ValueError):
            bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
            return bool(bound.arguments.get("inplace", False))
    return False


def _kind_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else node.op


def _resolve_inplace(gm: fx.GraphModule, where: dict[str, Where]) -> list[str]:
    """Redirect every use of a tensor that follows an in-place change of it to the
    in-place node's result; returns the refused cases (a view's base used afterwards)."""
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    problems = []
    for node in list(gm.graph.nodes):
        if not is_inplace(node, modules) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        target = node.args[0]
        for user in list(target.users):
            if order[user] > order[node]:
                user.replace_input_with(target, node)
        if _kind_name(target) in _VIEWS and isinstance(target.args[0], fx.Node):
            base = target.args[0]
            if any(order[u] > order[node] for u in base.users if u is not target):
                problems.append(
                    f"{node.op} {_kind_name(node)!r} changes {target.name!r} in place, a view of {base.name!r}"
                    f" that is read afterwards {where[node.name]}"
                )
    gm.graph.lint()
    gm.recompile()
    return problems


def trace(model: nn.Module, example: torch.Tensor, mode: str, is_leaf: Callable[[nn.Module], bool]) -> Traced:
    """Trace ``model`` in ``mode`` ("eval" or "train") and run the trace once on
    ``example``, leaving the model's state as it was."""
    if is_leaf(model):
        raise PortError(
            f"{type(model).__name__} is a single layer, which fx does not trace as a network:"
            " port nn.Sequential(layer), or the network it belongs to"
        )
    with preserved(model):
        model.train(mode == "train")
        tracer = _Tracer(is_leaf)
        try:
            graph = tracer.trace(model)
        except Exception as e:  # fx refuses data-dependent control flow and other dynamic Python
            raise PortError(
                f"torch.fx cannot trace {type(model).__name__} in {mode} mode: {type(e).__name__}: {e}\n"
                "(fx records one path through forward: branches on tensor values, and Python that"
                " needs a real tensor, do not trace; move them out of forward or make them static)"
            ) from None
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        where = {n.name: Where(_module_path(n), _source(n.stack_trace)) for n in gm.graph.nodes}
        problems = _resolve_inplace(gm, where)
        if problems:
            raise PortError("in-place changes that cannot be ported:\n" + "\n".join(f"  - {p}" for p in problems))
        recorder = _Recorder(gm)
        with torch.no_grad():
            recorder.run(example)
    return Traced(mode, gm, recorder.example, where)
