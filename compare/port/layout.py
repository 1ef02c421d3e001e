"""Where each torch axis is in the Flax value: layouts, and how every op moves them.

A torch value of rank n is held in Flax as ``flax = torch.transpose(perm)``: Flax axis
``j`` is torch axis ``perm[j]``. Convolutions, BatchNorm and pooling want channels last,
``(0, 2, ..., n-1, 1)``; elementwise ops take any layout; ``permute`` and ``transpose``
only change the bookkeeping (no data moves); a reduction over torch axes reduces their
Flax positions. A ``flatten`` of a channels-last map before a Linear is a *flat* layout:
the feature axis holds torch's ``(C, H, W)`` in ``(H, W, C)`` order, and the Linear's
weight is permuted instead of the activations. A transpose is generated only where an
op cannot run in the layout it is given (and then only the axes that must move).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Flat:
    """The last torch axis is a flatten of ``shape`` (torch order); Flax holds it flattened
    in the order ``order`` of those axes."""

    shape: tuple[int, ...]
    order: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    perm: tuple[int, ...]
    flat: Flat | None = None

    @staticmethod
    def identity(n: int) -> Layout:
        return Layout(tuple(range(n)))

    @staticmethod
    def channels_last(n: int) -> Layout:
        return Layout((0, *range(2, n), 1)) if n >= 3 else Layout.identity(n)

    @property
    def ndim(self) -> int:
        return len(self.perm)

    @property
    def is_channels_last(self) -> bool:
        return self == Layout.channels_last(self.ndim)

    def axis(self, torch_axis: int) -> int:
        """The Flax position of a torch axis (negative axes count from the end)."""
        return self.perm.index(torch_axis % self.ndim)

    def describe(self) -> str:
        """``(N, H, W, C)``-style, for comments."""
        names = _AXIS_NAMES.get(self.ndim, tuple(f"d{i}" for i in range(self.ndim)))
        inner = ", ".join(names[t] for t in self.perm)
        return f"({inner})" + (" flattened channels last" if self.flat else "")


_AXIS_NAMES = {1: ("N",), 2: ("N", "F"), 3: ("N", "C", "L"), 4: ("N", "C", "H", "W"), 5: ("N", "C", "D", "H", "W")}


def transpose_between(a: Layout, b: Layout) -> tuple[int, ...] | None:
    """The ``jnp.transpose`` axes that take a value held in ``a`` to ``b`` (None: nothing to do)."""
    perm = tuple(a.perm.index(t) for t in b.perm)
    return None if perm == tuple(range(len(perm))) else perm


def permuted(layout: Layout, dims: Sequence[int]) -> Layout:
    """The layout after torch's ``permute(dims)``, with the Flax value unchanged."""
    n = layout.ndim
    dims = [d % n for d in dims]
    inverse = {d: i for i, d in enumerate(dims)}
    return Layout(tuple(inverse[t] for t in layout.perm))


def reduced(layout: Layout, axes: Sequence[int], keepdim: bool) -> Layout:
    """The layout after a reduction over torch ``axes``."""
    if keepdim:
        return layout
    axes = {a % layout.ndim for a in axes}
    return Layout(tuple(t - sum(a < t for a in axes) for t in layout.perm if t not in axes))


def inserted(layout: Layout, dim: int) -> tuple[Layout, int]:
    """(layout, Flax position) of a new torch axis ``dim`` (``stack``, ``unsqueeze``)."""
    n = layout.ndim
    dim = dim % (n + 1)
    position = layout.perm.index(dim) if dim < n else n
    perm = [t + (t >= dim) for t in layout.perm]
    perm.insert(position, dim)
    return Layout(tuple(perm)), position


# --- reshape -----------------------------------------------------------------------------------


def _groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Runs of axes of ``a`` and ``b`` with equal products (axes of size 1 left out)."""
    ia, ib = [i for i, s in enumerate(a) if s != 1], [j for j, s in enumerate(b) if s != 1]
    groups, i, j = [], 0, 0
    while i < len(ia) or j < len(ib):
        if i == len(ia) or j == len(ib):
            return None
        ga, gb, pa, pb = [ia[i]], [ib[j]], a[ia[i]], b[ib[j]]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i == len(ia):
                    return None
                ga.append(ia[i])
                pa, i = pa * a[ia[i]], i + 1
            else:
                if j == len(ib):
                    return None
                gb.append(ib[j])
                pb, j = pb * b[ib[j]], j + 1
        groups.append((ga, gb))
    return groups


@dataclasses.dataclass(frozen=True)
class ReshapePlan:
    first: Layout | None  # the layout to move the value to before the reshape, or None
    out: Layout  # the result's layout; its perm is the order of the reshape's target axes


def reshape_plan(in_shape: Sequence[int], out_shape: Sequence[int], layout: Layout) -> ReshapePlan:
    """How a torch reshape ``in_shape -> out_shape`` of a value held in ``layout`` runs in Flax.

    torch reshapes in row-major order of its own axes. Each run of input axes that merges
    or splits into a run of output axes can be reshaped in place when those input axes
    are adjacent, in the same order, in the Flax value; otherwise they are first moved
    together (one transpose). A trailing run that is only out of order and becomes the
    last axis is left as it is, as a flat layout (see :class:`Flat`).
    """
    if layout.flat is not None or 0 in in_shape or 0 in out_shape:
        raise ValueError("reshape_plan takes a plain layout of a non-empty value")
    groups = _groups(in_shape, out_shape)
    if groups is None:
        raise ValueError(f"cannot reshape {tuple(in_shape)} to {tuple(out_shape)}")
    order = [t for t in layout.perm if in_shape[t] != 1]  # Flax order, size-1 axes left out (they move freely)
    position = {t: i for i, t in enumerate(order)}

    def fits(g: list[int]) -> bool:
        p = [position[t] for t in g]
        return p == list(range(p[0], p[0] + len(p)))

    if all(fits(g) for g, _ in groups):
        return _plan(None, groups, position, out_shape, None)
    last_in, last_out = groups[-1]
    trailing = sorted(position[t] for t in last_in) == list(range(len(order) - len(last_in), len(order)))
    if all(fits(g) for g, _ in groups[:-1]) and trailing and last_out == [len(out_shape) - 1]:
        held = [t for t in order if t in last_in]  # Flax order of the merged torch axes
        flat = Flat(tuple(in_shape[t] for t in last_in), tuple(last_in.index(t) for t in held))
        plan = _plan(None, groups, position, out_shape, flat)
        if plan.out.perm == tuple(range(len(out_shape))):
            return plan
    ordered = sorted(groups, key=lambda g: min(position[t] for t in g[0]))
    target = [t for g, _ in ordered for t in g] + [t for t in layout.perm if in_shape[t] == 1]
    position = {t: i for i, t in enumerate(target)}
    return _plan(Layout(tuple(target)), groups, position, out_shape, None)


def _plan(first, groups, position, out_shape, flat) -> ReshapePlan:
    out_perm = [t for _, gb in sorted(groups, key=lambda g: min(position[t] for t in g[0])) for t in gb]
    for k, size in enumerate(out_shape):
        if size == 1:  # an axis of size 1: right after the torch axis before it
            out_perm.insert(out_perm.index(k - 1) + 1 if k > 0 else 0, k)
    return ReshapePlan(first, Layout(tuple(out_perm), flat))


# --- arrays (inputs, outputs, masks) in numpy -------------------------------------------------------


def to_flax(x: np.ndarray, layout: Layout) -> np.ndarray:
    """A torch-layout array (or one that broadcasts like it) in ``layout``."""
    x = np.transpose(x, layout.perm)
    if layout.flat is not None:
        lead, flat = x.shape[:-1], layout.flat
        x = x.reshape(*lead, *flat.shape).transpose(*range(len(lead)), *(len(lead) + o for o in flat.order))
        x = x.reshape(*lead, -1)
    return np.ascontiguousarray(x)


def to_torch(x: np.ndarray, layout: Layout) -> np.ndarray:
    """Inverse of :func:`to_flax`."""
    if layout.flat is not None:
        lead, flat = x.shape[:-1], layout.flat
        held = tuple(flat.shape[o] for o in flat.order)
        back = [flat.order.index(i) for i in range(len(flat.order))]
        x = x.reshape(*lead, *held).transpose(*range(len(lead)), *(len(lead) + b for b in back)).reshape(*lead, -1)
    return np.ascontiguousarray(np.transpose(x, np.argsort(layout.perm)))
