"""How far apart two results are: one helper for arrays and trees of arrays.

Structure is compared before values (``chex.assert_trees_all_equal_structs``), so a
missing or extra leaf is an error that names it, never a silently smaller maximum. The
values are compared in float64, normwise: ``max_abs`` is max |a - b| over every leaf,
``scale`` is max |b| (the reference), and ``max_rel`` = ``max_abs / scale``, which does
not blow up where an entry of the reference is near zero. Where a check only needs a
pass/fail with a per-leaf message, ``chex.assert_trees_all_close`` is used directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import numpy as np

_TINY = float(np.finfo(np.float32).tiny)


@dataclasses.dataclass(frozen=True)
class Diff:
    max_abs: float
    scale: float  # max |reference|

    @property
    def max_rel(self) -> float:
        return self.max_abs / max(self.scale, _TINY)


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(tree)]


def tree_diff(got: Any, want: Any) -> Diff:
    """The largest difference between two arrays or two trees of the same structure."""
    chex.assert_trees_all_equal_structs(got, want)
    a, b = _leaves(got), _leaves(want)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            raise ValueError(f"leaf {i}: shape {x.shape} against {y.shape}")
    max_abs = max((float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True) if x.size), default=0.0)
    scale = max((float(np.max(np.abs(y))) for y in b if y.size), default=0.0)
    return Diff(max_abs, scale)


def max_abs(got: Any, want: Any) -> float:
    return tree_diff(got, want).max_abs


def max_rel(got: Any, want: Any, floor: float = 0.0) -> float:
    """max |got - want| / max(max |want|, floor)."""
    d = tree_diff(got, want)
    return d.max_abs / max(d.scale, floor, _TINY)
