"""The handlers' interface: the state of one generated forward.

A handler reads its arguments through :meth:`Emitter.value` / :meth:`Emitter.tensor`
(which converts a tensor to a layout the op accepts, with one transpose, only when it
must), declares the layers it calls (:meth:`Emitter.layer`) and their weights
(:meth:`Emitter.move`), and writes the node's one line (:meth:`Emitter.out_tensor`, ...).
"""

from __future__ import annotations

import keyword
from collections.abc import Callable
from typing import Any

from torch import fx

from compare.port.layout import Layout, transpose_between
from compare.port.ops.values import PyValue, SeqValue, TensorValue, Unsupported, flax_path
from compare.port.trace import TensorInfo, Traced

RESERVED = {"jax", "jnp", "nn", "nnx", "flaxbn", "ported", "pooling", "self", "train", "rngs", "np"}


class Emitter:
    """The state of one forward being written; the handlers' interface."""

    def __init__(self, gen, traced: Traced, train: str):
        self.gen, self.traced, self.api = gen, traced, gen.api
        self.train = train  # "train", or a literal "True" / "False" in a per-mode forward
        self.modules = dict(traced.gm.named_modules())
        self.values: dict[str, Any] = {}
        self.lines: list[str] = []
        self._converted: dict[tuple[str, Layout], TensorValue] = {}
        self.node: fx.Node | None = None
        self.names: set[str] = set(RESERVED)
        self._random_calls: dict[str, int] = {}

    def fresh(self, name: str) -> str:
        """A new local variable name (fx's node name when it is free)."""
        base = name if name.isidentifier() and not keyword.iskeyword(name) else f"v_{name}"
        out, i = base, 1
        while out in self.names:
            out, i = f"{base}_{i}", i + 1
        self.names.add(out)
        return out

    # --- reading arguments ---------------------------------------------------------------------

    def value(self, arg: Any) -> Any:
        """The value of an argument: fx nodes by their generated value, containers item by item."""
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr" and arg.name not in self.values:
                self.values[arg.name] = self._raw_param(arg)
            return self.values[arg.name]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def py(self, arg: Any) -> str:
        """A Python expression for an argument that is not a tensor."""
        v = self.value(arg)
        return self.py_of(v)

    def py_of(self, v: Any) -> str:
        if isinstance(v, PyValue):
            return v.expr
        if isinstance(v, TensorValue):
            raise Unsupported(f"a tensor ({v.name}) where a Python value is expected")
        if isinstance(v, (list, tuple)):
            inner = ", ".join(self.py_of(x) for x in v)
            return f"({inner},)" if len(v) == 1 else f"({inner})"
        return repr(v)

    def tensor(
        self, arg: Any, accept: Callable[[Layout], bool] | None = None, prefer: Layout | None = None
    ) -> TensorValue:
        """A tensor argument in a layout the op accepts (converted to ``prefer``, default
        torch's own order, when not)."""
        v = self.value(arg)
        if not isinstance(v, TensorValue):
            raise Unsupported(f"expected a tensor, got {type(v).__name__}")
        if accept is None or accept(v.layout):
            return v
        return self.convert(v, prefer or Layout.identity(v.ndim))

    def convert(self, v: TensorValue, layout: Layout) -> TensorValue:
        """``v`` held in ``layout``: one transpose (a flat layout is unflattened first)."""
        if v.layout == layout:
            return v
        key = (v.name, layout)
        if key in self._converted:
            return self._converted[key]
        expr, src = v.name, v.layout
        if src.flat is not None:  # (N, H*W*C) -> (N, C*H*W)
            flat, lead = src.flat, v.ndim - 1
            held = tuple(flat.shape[o] for o in flat.order)
            back = tuple([*range(lead), *(lead + flat.order.index(i) for i in range(len(flat.order)))])
            dims = ", ".join(f"{expr}.shape[{i}]" for i in range(lead))
            expr = f"jnp.reshape(jnp.transpose(jnp.reshape({expr}, ({dims}, *{held})), {back}), ({dims}, -1))"
            src = Layout(src.perm)
        perm = transpose_between(src, layout)
        if perm is not None:
            expr = f"jnp.transpose({expr}, {perm})"
        name = self.fresh(f"{v.name}_{'cl' if layout.is_channels_last else 't'}")
        self.lines.append(f"{name} = {expr}  # {v.layout.describe()} -> {layout.describe()}")
        self.gen.conversions += 1
        out = TensorValue(name, layout, v.shape, v.dtype)
        self._converted[key] = out
        return out

    def example(self, node: fx.Node | None = None) -> Any:
        return self.traced.example[(node or self.node).name]

    # --- layers and weights -----------------------------------------------------------------------

    def layer(self, path: str, linen: str, nnx: str) -> str:
        """Declare the layer at ``path`` (once) and return the expression that calls it."""
        return self.gen.declare(path, linen, nnx)

    def random_layer(self, preferred: str, linen: str, nnx: str, functional: bool) -> str:
        """A Dropout-like layer of its own for each call in this forward (a module called
        twice gets ``path`` and ``path_1``): one mask per call. A functional one sits at the
        top level, named after its node, away from torch's own names there. Returns its
        Flax path."""
        count = self._random_calls.get(preferred, 0)
        self._random_calls[preferred] = count + 1
        path = preferred if count == 0 else f"{preferred}_{count}"
        while functional and path in self.gen.children:
            path = f"{path}_call"
        self.gen.declare(path, linen, nnx)
        return flax_path(path)

    def move(self, torch_key: str, flax_key: str, to_flax, to_torch) -> None:
        self.gen.move(torch_key, flax_key, to_flax, to_torch)

    def param_of(self, node: Any, what: str) -> tuple[str, str, tuple[int, ...]]:
        """(owner module path, attribute name, shape) of a parameter passed to a function."""
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            raise Unsupported(f"{what} must be a parameter of a module (self.<name>), not a computed tensor")
        owner, _, attr = str(node.target).rpartition(".")
        info = self.traced.example[node.name]
        return owner, attr, tuple(info.shape)

    def _raw_param(self, node: fx.Node) -> TensorValue:
        """A parameter used as a value (a layer scale): a Flax parameter of its own."""
        key = str(node.target)
        owner, _, attr = key.rpartition(".")
        if key not in self.gen.parameters:
            raise Unsupported(f"{key!r} is a buffer used as a value (only parameters and BatchNorm statistics port)")
        info = self.traced.example[node.name]
        access = self.gen.declare_param(owner, attr, tuple(info.shape))
        name = self.fresh(node.name)
        read = f"{access}[...]" if self.api == "nnx" else access
        self.lines.append(f"{name} = {read}  # {key}")
        return TensorValue(name, Layout.identity(len(info.shape)), tuple(info.shape), info.dtype)

    # --- writing results ---------------------------------------------------------------------------

    def out_tensor(self, expr: str, layout: Layout, comment: str = "", info: Any = None) -> TensorValue:
        info = info if info is not None else self.example()
        if not isinstance(info, TensorInfo):
            raise Unsupported(f"expected a tensor result, got {info!r}")
        name = self._emit(expr, comment)
        out = TensorValue(name, layout, tuple(info.shape), info.dtype)
        self.values[self.node.name] = out
        return out

    def out_py(self, expr: str, comment: str = "") -> PyValue:
        name = self._emit(expr, comment)
        out = PyValue(name, self.example())
        self.values[self.node.name] = out
        return out

    def out_seq(self, expr: str, layout: Layout, comment: str = "") -> SeqValue:
        name = self._emit(expr, comment)
        items = tuple(
            TensorValue(f"{name}[{i}]", layout, tuple(t.shape), t.dtype) for i, t in enumerate(self.example())
        )
        out = SeqValue(name, items)
        self.values[self.node.name] = out
        return out

    def alias(self, value: Any, comment: str = "") -> None:
        """The node's result is ``value`` itself (a layout change, an identity)."""
        if isinstance(value, TensorValue):
            self.out_tensor(value.name, value.layout, comment)
        elif isinstance(value, SeqValue):
            name = self._emit(value.name, comment)
            self.values[self.node.name] = SeqValue(name, value.items)
        else:
            self.out_py(self.py_of(value), comment)

    def not_train(self) -> str:
        return {"train": "not train", "True": "False", "False": "True"}[self.train]

    def _emit(self, expr: str, comment: str) -> str:
        name = self.fresh(self.node.name)
        where = self.traced.where[self.node.name]
        if self.node.op == "call_module":  # torch's module path and type: "features.1 BatchNorm2d"
            module = f"{where.module} {type(self.modules[self.node.target]).__name__}"
            comment = f"{module}{': ' + comment if comment else ''}"
        elif where.module:  # a call inside a module's forward: which module
            comment = f"in {where.module}{': ' + comment if comment else ''}"
        self.lines.append(f"{name} = {expr}" + (f"  # {comment}" if comment else ""))
        return name
