"""Eval-mode equivalence of a generated port (``compare.port``) with its torch network:
the same input through both, outputs compared with the tolerance table."""

from __future__ import annotations

import copy
from typing import Any

import jax
import numpy as np
import torch

from compare.checks import diffs, tolerances
from compare.port.ported import Ported
from compare.port.trace import preserved
from compare.records import EquivalenceRecord


def check_eval(
    ported: Ported, x: np.ndarray, *, name: str = "port", got: Any = None, tol: tolerances.Tolerance | None = None
) -> dict:
    """The eval-mode record (:class:`compare.records.EquivalenceRecord`) of a port on ``x``
    (torch layout); ``got`` is the Flax output to judge (default: ``ported.run(x)``).

    A float32 port holds when its difference from torch is within the table's
    ``eval.<name>`` bound, or when its error against torch run in float64 is within
    ``eval.torch_own_error`` times torch's own float32 error there (deep networks with
    large activations: torch's float32 result is itself that far from the exact one).
    A float64 port is held to ``eval.float64``. The record adds ``torch_own_rel`` and
    ``vs_float64_rel`` (both relative to the float64 output's largest entry).
    """
    model = ported.torch_model
    xt = torch.as_tensor(np.asarray(x, ported.float_dtype))
    with preserved(model), torch.no_grad():
        model.eval()
        want = model(xt)
        exact = copy.deepcopy(model).double()(xt.double()) if ported.dtype == torch.float32 else None
    got = ported.run(x) if got is None else got
    if tol is None:
        tol = tolerances.get("eval.float64" if ported.dtype == torch.float64 else f"eval.{name}")
    diff = diffs.tree_diff(_leaves(got), _leaves(want))
    ok = tol.holds(diff.max_abs, diff.scale)
    extra = {}
    if exact is not None:
        own, port = diffs.tree_diff(_leaves(want), _leaves(exact)), diffs.tree_diff(_leaves(got), _leaves(exact))
        extra = {"torch_own_rel": own.max_rel, "vs_float64_rel": port.max_rel}
        ok = ok or tolerances.get("eval.torch_own_error").holds(port.max_abs, own.max_abs, own.scale)
    record = EquivalenceRecord(
        model=name,
        flax_api=ported.api,
        mode="eval",
        dtype=str(ported.float_dtype.__name__),
        max_abs_diff=diff.max_abs,
        max_rel_diff=diff.max_rel,
        tol=tol.bound(diff.scale),
        ok=ok,
        first_divergence=None,
    ).to_dict()
    return {**record, **extra}


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(t.detach().numpy() if isinstance(t, torch.Tensor) else t) for t in jax.tree.leaves(tree)]
