"""Shapes and structure: flatten, view/reshape, permute/transpose, size, mean, cat,
stack, chunk/split and ``getitem`` on tuples. torch's axis arguments become the Flax
positions of those axes; ``permute`` and ``transpose`` change only the layout (no data
moves); a reshape moves data only when torch's row-major order cannot be had in place
(see :func:`compare.port.layout.reshape_plan`)."""

from __future__ import annotations

from torch import fx

from compare.port.layout import inserted, permuted, reduced, reshape_plan
from compare.port.ops.table import Call
from compare.port.ops.values import PyValue, SeqValue, TensorValue, Unsupported, constant
from compare.port.trace import TensorInfo


def _plain(e, arg) -> TensorValue:
    """A tensor argument whose feature axis is not a flattened channels-last map."""
    return e.tensor(arg, lambda lay: lay.flat is None, None)


def _reshape(e, x: TensorValue, out_shape: tuple[int, ...], exprs, comment: str) -> None:
    """``exprs(x)`` gives torch's target shape, one expression per output axis, for the
    (possibly moved) value ``x``."""
    try:
        plan = reshape_plan(x.shape, out_shape, x.layout)
    except ValueError as err:
        raise Unsupported(str(err)) from None
    if plan.first is not None:
        x = e.convert(x, plan.first)
    dims = exprs(x)
    target = ", ".join(dims[t] for t in plan.out.perm)
    e.out_tensor(f"jnp.reshape({x.name}, ({target}{',' if len(dims) == 1 else ''}))", plan.out, comment)


def flatten(e, c: Call) -> None:
    x = _plain(e, c.args["input"])
    n = x.ndim
    if n == 0:
        e.alias(x)
        return
    start, end = constant(c.args["start_dim"], "start_dim") % n, constant(c.args["end_dim"], "end_dim") % n
    if start == end:
        e.alias(x, "flatten of one axis: nothing to do")
        return
    merged = 1
    for s in x.shape[start : end + 1]:
        merged *= s
    out_shape = (*x.shape[:start], merged, *x.shape[end + 1 :])

    def exprs(v: TensorValue) -> list[str]:
        keep = [*range(start), *range(end + 1, n)]
        dims = [f"{v.name}.shape[{v.layout.axis(t)}]" for t in keep]
        return [*dims[:start], "-1", *dims[start:]]

    _reshape(e, x, out_shape, exprs, f"torch.flatten(start_dim={start}, end_dim={end})")


def reshape(e, c: Call) -> None:
    x = _plain(e, c.args["input"])
    shape = c.args["shape"]
    if isinstance(shape, tuple) and len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = shape[0]  # x.view((a, b)) as x.view(a, b)
    exprs = [e.py(s) for s in shape]
    _reshape(e, x, tuple(e.example().shape), lambda v: exprs, f"torch shape ({', '.join(exprs)})")


def _dims(arg) -> tuple[int, ...]:
    dims = constant(arg, "dims")
    return tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)


def permute(e, c: Call) -> None:
    x = _plain(e, c.args["input"])
    dims = _dims(c.args["dims"])
    e.out_tensor(x.name, permuted(x.layout, dims), f"permute{dims}: the layout changes, the data does not")


def transpose(e, c: Call) -> None:
    x = _plain(e, c.args["input"])
    d0, d1 = constant(c.args["dim0"], "dim0") % x.ndim, constant(c.args["dim1"], "dim1") % x.ndim
    dims = list(range(x.ndim))
    dims[d0], dims[d1] = d1, d0
    e.out_tensor(x.name, permuted(x.layout, dims), f"transpose({d0}, {d1}): the layout changes, the data does not")


def _shape_expr(x: TensorValue) -> str:
    dims = ", ".join(f"{x.name}.shape[{x.layout.axis(t)}]" for t in range(x.ndim))
    return f"({dims}{',' if x.ndim == 1 else ''})"


def size(e, c: Call) -> None:
    x = e.tensor(c.args["input"])
    dim = c.args["dim"]
    if dim is None:
        e.out_py(_shape_expr(x), "torch's order")
    else:
        e.out_py(f"{x.name}.shape[{x.layout.axis(constant(dim, 'dim'))}]", f"size({dim})")


def getattr_(e, c: Call) -> None:
    x, name = e.value(c.args["input"]), c.args["name"]
    if not isinstance(x, TensorValue) or name not in ("shape", "ndim"):
        raise Unsupported(f"getattr(..., {name!r}) (only a tensor's shape and ndim)")
    e.out_py(_shape_expr(x) if name == "shape" else repr(x.ndim), f".{name} in torch's order")


def getitem(e, c: Call) -> None:
    if isinstance(c.args["input"], fx.Node) and isinstance(e.example(c.args["input"]), TensorInfo):
        raise Unsupported("indexing or slicing a tensor")  # known from the trace, before the input's value
    obj, index = e.value(c.args["input"]), c.args["index"]
    if isinstance(obj, SeqValue):
        e.alias(obj.items[constant(index, "index")])
    elif isinstance(obj, PyValue):
        e.out_py(f"{obj.expr}[{e.py(index)}]")
    else:
        e.out_py(repr(obj[index]))


def mean(e, c: Call) -> None:
    x = _plain(e, c.args["input"])
    if c.args["dtype"] is not None:
        raise Unsupported("mean(dtype=...)")
    dim, keepdim = constant(c.args["dim"], "dim"), bool(constant(c.args["keepdim"], "keepdim"))
    dims = tuple(range(x.ndim)) if dim is None else ((dim,) if isinstance(dim, int) else tuple(dim))
    axes = tuple(sorted(x.layout.axis(d) for d in dims))
    keep = ", keepdims=True" if keepdim else ""
    e.out_tensor(
        f"jnp.mean({x.name}, axis={axes}{keep})", reduced(x.layout, dims, keepdim), f"mean over torch axes {dims}"
    )


def _common(e, arg) -> list[TensorValue]:
    """The tensors of a list argument, all in the first one's layout."""
    values = [e.value(a) for a in arg]
    if not values or not all(isinstance(v, TensorValue) for v in values):
        raise Unsupported("expected a list of tensors")
    first = _plain(e, arg[0])
    return [first, *(e.convert(v, first.layout) for v in values[1:])]


def cat(e, c: Call) -> None:
    xs = _common(e, c.args["tensors"])
    dim = constant(c.args["dim"], "dim")
    names = ", ".join(x.name for x in xs)
    e.out_tensor(f"jnp.concatenate([{names}], axis={xs[0].layout.axis(dim)})", xs[0].layout, f"cat(dim={dim})")


def stack(e, c: Call) -> None:
    xs = _common(e, c.args["tensors"])
    dim = constant(c.args["dim"], "dim")
    layout, axis = inserted(xs[0].layout, dim)
    names = ", ".join(x.name for x in xs)
    e.out_tensor(f"jnp.stack([{names}], axis={axis})", layout, f"stack(dim={dim})")


def chunk(e, c: Call) -> None:
    x = _plain(e, c.args["input"])
    dim = constant(c.args["dim"], "dim")
    chunks = constant(c.args["chunks"], "chunks")
    e.out_seq(f"ported.chunk({x.name}, {chunks}, axis={x.layout.axis(dim)})", x.layout, f"chunk(dim={dim})")


def split(e, c: Call) -> None:
    x = _plain(e, c.args["input"])
    dim = constant(c.args["dim"], "dim")
    sizes = constant(c.args["split_size_or_sections"], "split_size_or_sections")
    sizes = sizes if isinstance(sizes, int) else tuple(sizes)
    e.out_seq(f"ported.split({x.name}, {sizes}, axis={x.layout.axis(dim)})", x.layout, f"split(dim={dim})")
