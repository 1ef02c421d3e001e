"""What the generated code holds for each fx node, and what the handlers report back.

A tensor is a variable in some :class:`~compare.port.layout.Layout`; a Python value (the
ints of ``size()``, a constant) is an expression; a tuple (``chunk``, a module returning
several tensors) is a variable with its items. Handlers raise :class:`Unsupported` for
arguments they cannot port; the generator lists every such node at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from flax import linen, nnx

from compare.port.layout import Layout

# torch names that cannot name a Flax child (linen Module and nnx.Dict attributes, the
# generated classes' own): such a name gets a trailing "_" on the Flax side
CLASHES = (
    {n for n in dir(linen.Module) if not n.startswith("__")}
    | {n for n in dir(nnx.Dict) if not n.startswith("__")}
    | {"name", "parent", "scope", "params", "batch_stats", "entries", "param_shapes", "deterministic"}
    | {"forward_eval", "forward_train"}
)


def flax_path(path: str) -> str:
    """The Flax path (dotted) of a torch module path: the same names, one of :data:`CLASHES` with a "_"."""
    return ".".join(f"{p}_" if p in CLASHES else p for p in path.split("."))


class Unsupported(Exception):
    """A node whose arguments cannot be ported; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class TensorValue:
    name: str
    layout: Layout
    shape: tuple[int, ...]  # torch's shape at the example input
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclasses.dataclass(frozen=True)
class PyValue:
    expr: str
    value: Any  # at the example input


@dataclasses.dataclass(frozen=True)
class SeqValue:
    name: str
    items: tuple[Any, ...]  # TensorValue | PyValue | SeqValue


@dataclasses.dataclass(frozen=True)
class Site:
    """A random layer (Dropout, stochastic depth) of the train-mode forward: where a
    keep-mask is injected for an exact train-mode comparison."""

    node: str  # the fx node in the train trace
    path: str  # the Flax layer, dotted ("classifier.2")
    kind: str  # "dropout" or "stochastic_depth"
    rate: float
    mask_shape: tuple[int, ...]  # in torch's layout, broadcasting against the input
    layout: Layout  # the input's layout in Flax (the mask's too)


def constant(value: Any, what: str) -> Any:
    """``value`` when it is a constant (not computed by the network), else Unsupported."""
    if isinstance(value, (TensorValue, PyValue, SeqValue)):
        raise Unsupported(f"{what} must be a constant, not a value computed in forward")
    return value


def ints(value: Any, n: int) -> tuple[int, ...]:
    """An int or a sequence of ints as a tuple of ``n`` ints (torch's ``_pair``)."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return tuple(value) * n
        if len(value) != n:
            raise Unsupported(f"expected {n} values, got {tuple(value)}")
        return tuple(int(v) for v in value)
    return (int(value),) * n
