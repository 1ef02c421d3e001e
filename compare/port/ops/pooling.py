"""Pooling, channels last: ``flaxbn.pooling`` computes torch's output sizes, windows,
padding and divisors (``ceil_mode``, ``count_include_pad``, adaptive windows of any size)."""

from __future__ import annotations

from compare.port.layout import Layout
from compare.port.ops.table import Call
from compare.port.ops.values import Unsupported, constant, ints


def _input(e, c: Call):
    n = c.args["spatial"]
    if e.value(c.args["input"]).ndim != n + 2:
        raise Unsupported(f"a {e.value(c.args['input']).ndim}-d input (ports with a batch axis: {n + 2}-d)")
    return e.tensor(c.args["input"], lambda lay: lay == Layout.channels_last(n + 2), Layout.channels_last(n + 2)), n


def max_pool(e, c: Call) -> None:
    x, n = _input(e, c)
    if constant(c.args["return_indices"], "return_indices"):
        raise Unsupported("return_indices=True")
    kernel = ints(constant(c.args["kernel_size"], "kernel_size"), n)
    stride = constant(c.args["stride"], "stride")
    stride = kernel if stride is None or stride == [] or stride == () else ints(stride, n)
    options = f"stride={stride}, padding={ints(constant(c.args['padding'], 'padding'), n)}"
    dilation = ints(constant(c.args["dilation"], "dilation"), n)
    options += f", dilation={dilation}" if any(d != 1 for d in dilation) else ""
    options += ", ceil_mode=True" if constant(c.args["ceil_mode"], "ceil_mode") else ""
    e.out_tensor(f"pooling.max_pool({x.name}, {kernel}, {options})", x.layout)


def avg_pool(e, c: Call) -> None:
    x, n = _input(e, c)
    kernel = ints(constant(c.args["kernel_size"], "kernel_size"), n)
    stride = constant(c.args["stride"], "stride")
    stride = kernel if stride is None or stride == [] or stride == () else ints(stride, n)
    options = f"stride={stride}, padding={ints(constant(c.args['padding'], 'padding'), n)}"
    options += ", ceil_mode=True" if constant(c.args["ceil_mode"], "ceil_mode") else ""
    options += "" if constant(c.args["count_include_pad"], "count_include_pad") else ", count_include_pad=False"
    divisor = constant(c.args.get("divisor_override"), "divisor_override")
    options += f", divisor_override={divisor}" if divisor else ""
    e.out_tensor(f"pooling.avg_pool({x.name}, {kernel}, {options})", x.layout)


def _output_size(c: Call, n: int) -> tuple:
    size = constant(c.args["output_size"], "output_size")
    return (size,) * n if size is None or isinstance(size, int) else tuple(size)


def adaptive_avg_pool(e, c: Call) -> None:
    x, n = _input(e, c)
    e.out_tensor(f"pooling.adaptive_avg_pool({x.name}, {_output_size(c, n)})", x.layout)


def adaptive_max_pool(e, c: Call) -> None:
    x, n = _input(e, c)
    if constant(c.args["return_indices"], "return_indices"):
        raise Unsupported("return_indices=True")
    e.out_tensor(f"pooling.adaptive_max_pool({x.name}, {_output_size(c, n)})", x.layout)
