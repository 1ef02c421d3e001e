"""The supported torch operations (``table``) and one handler per kind, which writes the
Flax line of a node (``layers``, ``elementwise``, ``shapes``, ``pooling``) through the
interface of ``emitter``."""

from __future__ import annotations

from compare.port.ops import elementwise, layers, pooling, shapes
from compare.port.ops.table import KINDS, Call, lookup, module_form, supported

HANDLERS = {
    "conv": layers.conv,
    "linear": layers.linear,
    "batch_norm": layers.batch_norm,
    "layer_norm": layers.layer_norm,
    "group_norm": layers.group_norm,
    "dropout": layers.dropout,
    "stochastic_depth": layers.stochastic_depth,
    **{kind: elementwise.activation for kind in elementwise.ACTIVATIONS},
    "gelu": elementwise.gelu,
    "leaky_relu": elementwise.leaky_relu,
    "identity": elementwise.identity,
    "neg": elementwise.neg,
    **{kind: elementwise.arithmetic for kind in ("add", "sub", "mul", "truediv", "floordiv")},
    "max_pool": pooling.max_pool,
    "avg_pool": pooling.avg_pool,
    "adaptive_avg_pool": pooling.adaptive_avg_pool,
    "adaptive_max_pool": pooling.adaptive_max_pool,
    "flatten": shapes.flatten,
    "reshape": shapes.reshape,
    "permute": shapes.permute,
    "transpose": shapes.transpose,
    "size": shapes.size,
    "getattr": shapes.getattr_,
    "getitem": shapes.getitem,
    "mean": shapes.mean,
    "cat": shapes.cat,
    "stack": shapes.stack,
    "chunk": shapes.chunk,
    "split": shapes.split,
}
assert set(HANDLERS) == set(KINDS), sorted(set(KINDS) ^ set(HANDLERS))

__all__ = ["HANDLERS", "KINDS", "Call", "lookup", "module_form", "supported"]
