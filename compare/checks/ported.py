"""Equivalence of a generated port (``compare.port``) with its torch network.

* eval: the same input through the torch model and the port, outputs compared with the
  tolerance table's ``eval.<name>`` bound (``eval.float64`` for a float64 port);
* train: one train-mode step on both sides with the same injected dropout and
  stochastic-depth masks (``compare.port.inject``): the outputs, every gradient (moved to
  torch's layout by the weight map, which is linear), the updated running statistics and
  counters, and the parameters after one plain SGD step (``p - lr * grad`` on both sides),
  with the ``train.*`` bounds (``train.float64`` for a float64 port). The loss
  is cross-entropy for ``(N, K)`` outputs and a fixed random projection otherwise. The
  torch model is left as it was.
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import flaxbn.train as ftrain
from compare import transfer
from compare.checks import diffs, tolerances
from compare.port import inject, layout, weights
from compare.port.ported import Ported
from compare.port.trace import TensorInfo, preserved
from compare.records import EquivalenceRecord


def _bound(ported: Ported, name: str) -> tolerances.Tolerance:
    return tolerances.get("train.float64" if ported.dtype == torch.float64 else name)


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
        ok = ok or tolerances.get("eval.torch_own_error").holds(port.max_abs, own.max_abs)
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


def _first(out: Any):
    return jax.tree.leaves(out)[0]


class _Loss:
    """Cross-entropy for (N, K) outputs, else a fixed random projection; the same on both sides."""

    def __init__(self, ported: Ported, rng: np.random.Generator):
        self.structure = _first_structure(ported)
        example = ported.traced_train.example["output"]
        out_shape = tuple(jax.tree.leaves(example, is_leaf=lambda t: isinstance(t, TensorInfo))[0].shape)
        self.classes = len(out_shape) == 2
        if self.classes:
            self.labels = rng.integers(0, out_shape[1], out_shape[0])
        else:
            self.r = rng.standard_normal(out_shape)

    def torch(self, out: torch.Tensor) -> torch.Tensor:
        if self.classes:
            return torch.nn.functional.cross_entropy(out, torch.from_numpy(self.labels))
        return (out * torch.from_numpy(self.r).to(out.dtype)).sum() / out.shape[0]

    def flax(self, out: jax.Array) -> jax.Array:
        if self.classes:
            return ftrain.cross_entropy(out, jnp.asarray(self.labels))
        return (out * jnp.asarray(layout.to_flax(self.r, self.structure), out.dtype)).sum() / out.shape[0]


def check_train(ported: Ported, x: np.ndarray, *, seed: int = 0, lr: float = 0.1) -> dict:
    """One train-mode step with injected masks on both sides; returns the differences and
    ``ok`` (every bound of the table held and the counters are equal)."""
    model = ported.torch_model
    xt = torch.as_tensor(np.asarray(x, ported.float_dtype))
    rng = np.random.default_rng(seed)
    masks = inject.draw(ported.sites, rng)
    loss = _Loss(ported, rng)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        faithful = inject.trace_is_faithful(ported, xt, seed)
        torch_side = _torch_step(ported, xt, masks, loss, lr)
        model.load_state_dict(saved)
        flax_side = _flax_step(ported, saved, x, masks, loss, lr)
    finally:
        model.load_state_dict(saved)
        for p in model.parameters():
            p.grad = None
    return _compare(ported, torch_side, flax_side, faithful)


def _torch_step(ported: Ported, xt, masks, loss: _Loss, lr: float) -> dict:
    model = ported.torch_model
    masked = inject.torch_masked(ported, masks)
    exact = _float64_grads(masked, xt, loss) if ported.dtype == torch.float32 else None
    model.train()
    for p in model.parameters():
        p.grad = None
    out = _first(masked(xt))
    loss.torch(out).backward()
    params = dict(model.named_parameters())
    result = {
        "exact_grads": exact,
        "out": out.detach().numpy().copy(),
        "grads": {k: p.grad.numpy().copy() for k, p in params.items() if p.grad is not None},
        "buffers": {k: v.numpy().copy() for k, v in model.state_dict().items() if k not in params},
    }
    with torch.no_grad():
        for p in params.values():
            if p.grad is not None:
                p -= lr * p.grad  # torch.optim.SGD(lr) without momentum
    result["params"] = {k: p.detach().numpy().copy() for k, p in params.items()}
    model.eval()
    return result


def _float64_grads(masked: torch.fx.GraphModule, xt, loss: _Loss) -> dict[str, np.ndarray]:
    """The same masked step in float64 on a copy: the gradients to float32's resolution,
    to tell the ones that are exactly zero (a bias before a BatchNorm: the mean is subtracted)."""
    double = copy.deepcopy(masked).double().train()
    loss.torch(_first(double(xt.double()))).backward()
    return {k: p.grad.numpy() for k, p in double.named_parameters() if p.grad is not None}


def _flax_step(ported: Ported, state_dict, x, masks, loss_fn: _Loss, lr: float) -> dict:
    flat = weights.torch_to_flat(state_dict, ported.moves, ported.unused, float_dtype=ported.float_dtype)
    keep = inject.flax_masks(ported.sites, masks)
    with ported.x64():
        xf = jnp.asarray(ported.flax_input(x))
        if ported.api == "linen":
            variables = transfer.flat_to_linen(flat)
            apply = inject.linen_apply(ported, [jnp.asarray(k) for k in keep])

            def loss(params):
                out, updates = apply({**variables, "params": params}, xf, train=True, mutable=["batch_stats"])
                return loss_fn.flax(_first(out)), (_first(out), updates["batch_stats"])

            (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
            new_flat = transfer.linen_to_flat({"params": grads, "batch_stats": stats})
        else:
            model = ported.new_model(flat)
            model.train()
            with inject.nnx_masked(model, ported.sites, [jnp.asarray(k) for k in keep]):

                @nnx.jit
                def step(model):
                    def loss(model):
                        out = _first(model(xf))
                        return loss_fn.flax(out), out

                    return nnx.value_and_grad(loss, has_aux=True)(model)

                (_, out), grads = step(model)
            grads_flat = transfer.linen_to_flat({"params": nnx.to_pure_dict(grads)})
            stats_flat = {k: v for k, v in transfer.nnx_to_flat(model).items() if k.startswith("batch_stats/")}
            new_flat = {**grads_flat, **stats_flat}
    step_params = {k: flat[k] - lr * np.asarray(v) for k, v in new_flat.items() if k.startswith("params/")}  # SGD
    return {
        "out": ported.torch_output(out, _first_structure(ported)),
        "grads": _named(ported, new_flat, "params"),
        "buffers": _named(ported, new_flat, "batch_stats"),
        "params": _named(ported, step_params, "params"),
    }


def _first_structure(ported: Ported):
    structure = ported.generated.outputs["train"]
    return jax.tree.leaves(structure)[0] if isinstance(structure, (list, tuple, dict)) else structure


def _named(ported: Ported, flat: dict, collection: str) -> dict[str, np.ndarray]:
    """Flat Flax arrays of one collection by their torch names, in torch's layouts."""
    return {
        m.torch_key: np.asarray(m.to_torch(np.asarray(flat[m.flax_key])))
        for m in ported.moves
        if m.flax_key.startswith(collection + "/") and m.flax_key in flat
    }


def _grad_diffs(t: dict, f: dict) -> tuple[dict[str, float], list[str], bool]:
    """Per-tensor gradient differences (relative, floored at 1% of the largest gradient
    entry, as ``compare.checks.train_equivalence``), the tensors whose exact gradient is
    zero, and whether those are at torch's own float32 noise level (``train.grads_zero``)."""
    floor = 1e-2 * max((float(np.max(np.abs(g))) for g in t["grads"].values() if g.size), default=0.0)
    rel = {k: diffs.max_rel(f["grads"][k], g, floor) for k, g in t["grads"].items()}
    exact = t["exact_grads"]
    if exact is None:
        return rel, [], True
    top = max((float(np.max(np.abs(g))) for g in exact.values() if g.size), default=0.0)
    zero = [k for k in rel if k in exact and float(np.max(np.abs(exact[k]), initial=0.0)) <= 1e-9 * top]
    noise = tolerances.get("train.grads_zero")
    zero_ok = all(noise.holds(float(np.max(np.abs(f["grads"][k]))), float(np.max(np.abs(t["grads"][k])))) for k in zero)
    return {k: v for k, v in rel.items() if k not in zero}, zero, zero_ok


def _compare(ported: Ported, t: dict, f: dict, faithful: float) -> dict:
    logits, stats_tol, grads_tol = (
        _bound(ported, "train.logits"),
        _bound(ported, "train.stats"),
        _bound(ported, "train.grads"),
    )
    out = diffs.tree_diff(f["out"], t["out"])
    grads, zero, zero_ok = _grad_diffs(t, f)
    running = [k for k in t["buffers"] if "running" in k]
    stats = diffs.tree_diff({k: f["buffers"][k] for k in running}, {k: t["buffers"][k] for k in running})
    counters = all(int(f["buffers"][k]) == int(v) for k, v in t["buffers"].items() if k.endswith("num_batches_tracked"))
    step = diffs.tree_diff({k: f["params"][k] for k in t["params"]}, t["params"])
    step_tol = _bound(ported, "train.step")
    checks = {
        "out": logits.holds(out.max_abs, out.scale),
        "grads": grads_tol.holds(max(grads.values(), default=0.0), 1.0) and zero_ok,
        "stats": stats_tol.holds(stats.max_abs, stats.scale),
        "counters": counters,
        "step": step_tol.holds(step.max_abs, step.scale),
        "trace": faithful == 0.0,
    }
    return {
        "out_max_abs_diff": out.max_abs,
        "out_max_rel_diff": out.max_rel,
        "grad_max_rel_diff": max(grads.values(), default=0.0),
        "grad_rel_diff": grads,
        "zero_grads": zero,
        "stats_max_abs_diff": stats.max_abs,
        "stats_max_rel_diff": stats.max_rel,
        "step_max_abs_diff": step.max_abs,
        "step_max_rel_diff": step.max_rel,
        "trace_diff": faithful,
        "checks": checks,
        "ok": all(checks.values()),
    }
