"""Elementwise operations: activations (any layout, kept) and arithmetic, on tensors
(torch's broadcasting, in the larger operand's layout) or on Python ints (the shape
arithmetic of a channel shuffle)."""

from __future__ import annotations

import math

from compare.port.layout import Layout, transpose_between
from compare.port.ops.table import Call
from compare.port.ops.values import TensorValue, Unsupported, constant

# kind -> the JAX function with torch's exact formula (jax.nn.gelu's default is the tanh form, torch's the exact one)
ACTIVATIONS = {
    "relu": "jax.nn.relu({x})",
    "relu6": "jax.nn.relu6({x})",
    "silu": "jax.nn.silu({x})",
    "hardswish": "jax.nn.hard_swish({x})",
    "hardsigmoid": "jax.nn.hard_sigmoid({x})",
    "sigmoid": "jax.nn.sigmoid({x})",
    "tanh": "jnp.tanh({x})",
}


def activation(e, c: Call) -> None:
    x = e.tensor(c.args["input"])
    e.out_tensor(ACTIVATIONS[c.kind].format(x=x.name), x.layout)


def gelu(e, c: Call) -> None:
    x = e.tensor(c.args["input"])
    approximate = constant(c.args["approximate"], "approximate")
    if approximate not in ("none", "tanh"):
        raise Unsupported(f"approximate={approximate!r}")
    e.out_tensor(f"jax.nn.gelu({x.name}, approximate={approximate == 'tanh'})", x.layout)


def leaky_relu(e, c: Call) -> None:
    x = e.tensor(c.args["input"])
    slope = constant(c.args["negative_slope"], "negative_slope")
    e.out_tensor(f"jax.nn.leaky_relu({x.name}, negative_slope={slope})", x.layout)


def identity(e, c: Call) -> None:
    e.alias(e.value(c.args["input"]), f"{c.form} {c.kind if c.form == 'module' else c.node.target}: identity")


# --- arithmetic -------------------------------------------------------------------------------------

_SYMBOLS = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//"}


def _operand(e, v, main: TensorValue) -> str:
    """An operand as an expression that broadcasts against ``main`` in ``main``'s layout."""
    if not isinstance(v, TensorValue):
        return e.py_of(v)
    if v.ndim == 0 or v.layout == main.layout:
        return v.name
    if v.ndim == main.ndim and v.layout.flat is None and main.layout.flat is None:
        return e.convert(v, main.layout).name
    if main.layout.flat is not None or v.layout.flat is not None:
        raise Unsupported("broadcasting against a flattened channels-last value")
    # torch aligns trailing axes: the operand in torch's order, with leading axes of size 1, in main's layout
    torch_order = e.convert(v, Layout.identity(v.ndim)).name
    lead = main.ndim - v.ndim
    expr = f"jnp.reshape({torch_order}, {(1,) * lead} + {torch_order}.shape)" if lead else torch_order
    perm = transpose_between(Layout.identity(main.ndim), main.layout)
    return f"jnp.transpose({expr}, {perm})" if perm else expr


def arithmetic(e, c: Call) -> None:
    a, b = e.value(c.args["input"]), e.value(c.args["other"])
    symbol = _SYMBOLS[c.kind]
    alpha = c.args.get("alpha", 1)
    if c.args.get("rounding_mode") is not None:
        raise Unsupported(f"rounding_mode={c.args['rounding_mode']!r}")
    tensors = [v for v in (a, b) if isinstance(v, TensorValue)]
    if not tensors:
        scaled = e.py_of(b) if alpha == 1 else f"{alpha!r} * {e.py_of(b)}"
        e.out_py(f"{e.py_of(a)} {symbol} {scaled}")
        return
    if c.kind == "floordiv":
        raise Unsupported("// of tensors (only of Python ints, for shape arithmetic)")
    main = max(tensors, key=lambda t: (t.ndim, math.prod(t.shape)))  # the larger operand keeps its layout
    left, right = _operand(e, a, main), _operand(e, b, main)
    if alpha != 1:
        right = f"{constant(alpha, 'alpha')!r} * {right}"
    e.out_tensor(f"{left} {symbol} {right}", main.layout)


def neg(e, c: Call) -> None:
    v = e.value(c.args["input"])
    if isinstance(v, TensorValue):
        e.out_tensor(f"-{v.name}", v.layout)
    else:
        e.out_py(f"-{e.py_of(v)}")
