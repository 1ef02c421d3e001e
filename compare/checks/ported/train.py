"""One train-mode step of a generated port and of its torch network, with the same
injected dropout and stochastic-depth masks (``compare.port.inject``).

Compared: the output, every gradient (moved to torch's layout by the weight map, which is
linear), the updated running statistics and counters, and the parameters after one plain
SGD step (``p - lr * grad`` on both sides). The loss is cross-entropy for ``(N, K)``
outputs and a fixed random projection otherwise. The torch model is left as it was.

A float64 port is held to ``train.float64``. A float32 one to the ``train.*`` bounds, or,
where those are too tight for the network (BatchNorm over few values, large activations,
a gradient that is exactly zero: a bias before a BatchNorm), to its error against the same
torch step in float64 within ``train.port`` times torch's own float32 error there, as the
divergence report judges layers.
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
from compare.port.trace import TensorInfo


def _first(out: Any):
    return jax.tree.leaves(out)[0]


def _first_structure(ported: Ported):
    structure = ported.generated.outputs["train"]
    return jax.tree.leaves(structure)[0] if isinstance(structure, (list, tuple, dict)) else structure


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
    ``ok`` (every quantity within its bound, the counters equal, the trace faithful)."""
    model = ported.torch_model
    xt = torch.as_tensor(np.asarray(x, ported.float_dtype))
    rng = np.random.default_rng(seed)
    masks = inject.draw(ported.sites, rng)
    loss = _Loss(ported, rng)
    state = model.state_dict(keep_vars=True)
    saved = {k: v.detach().clone() for k, v in state.items()}
    try:
        faithful = inject.trace_is_faithful(ported, xt, seed)
        masked = inject.torch_masked(ported, masks)
        exact = (
            _torch_step(copy.deepcopy(masked).double(), xt.double(), loss, lr)
            if ported.dtype == torch.float32
            else None
        )
        torch_side = _torch_step(masked, xt, loss, lr)
    finally:
        with torch.no_grad():  # in place: a module's own _load_from_state_dict is not asked
            for k, v in state.items():
                v.copy_(saved[k])
        for p in model.parameters():
            p.grad = None
        model.eval()
    flax_side = _flax_step(ported, saved, x, masks, loss, lr)
    return _compare(ported, torch_side, flax_side, exact, faithful)


def _torch_step(gm: torch.fx.GraphModule, xt: torch.Tensor, loss: _Loss, lr: float) -> dict:
    """Forward, backward and an SGD step of the masked trace; its parameters and buffers
    are the model's (or a float64 copy's), by the model's names."""
    gm.train()
    params = dict(gm.named_parameters())
    for p in params.values():
        p.grad = None
    out = _first(gm(xt))
    loss.torch(out).backward()
    result = {
        "out": out.detach().numpy().copy(),
        "grads": {k: p.grad.numpy().copy() for k, p in params.items() if p.grad is not None},
        "buffers": {
            k: v.numpy().copy() for k, v in gm.state_dict().items() if k not in params and "port_mask" not in k
        },
    }
    with torch.no_grad():
        for p in params.values():
            if p.grad is not None:
                p -= lr * p.grad  # torch.optim.SGD(lr) without momentum
    result["params"] = {k: p.detach().numpy().copy() for k, p in params.items()}
    return result


def _flax_step(ported: Ported, state_dict, x, masks, loss_fn: _Loss, lr: float) -> dict:
    flat = weights.torch_to_flat(state_dict, ported.moves, ported.unused, float_dtype=ported.float_dtype)
    keep = [jnp.asarray(k) for k in inject.flax_masks(ported.sites, masks)]
    with ported.x64():
        xf = jnp.asarray(ported.flax_input(x))
        if ported.api == "linen":
            variables = transfer.flat_to_linen(flat)
            apply = inject.linen_apply(ported, keep)

            def loss(params):
                out, updates = apply({**variables, "params": params}, xf, train=True, mutable=["batch_stats"])
                return loss_fn.flax(_first(out)), (_first(out), updates["batch_stats"])

            (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
            new_flat = transfer.linen_to_flat({"params": grads, "batch_stats": stats})
        else:
            model = ported.new_model(flat)
            model.train()
            with inject.nnx_masked(model, ported.sites, keep):

                @nnx.jit
                def step(model):
                    def loss(model):
                        out = _first(model(xf))
                        return loss_fn.flax(out), out

                    return nnx.value_and_grad(loss, has_aux=True)(model)

                (_, out), grads = step(model)
            new_flat = transfer.linen_to_flat({"params": nnx.to_pure_dict(grads)})
            new_flat.update({k: v for k, v in transfer.nnx_to_flat(model).items() if k.startswith("batch_stats/")})
    step_params = {k: flat[k] - lr * np.asarray(v) for k, v in new_flat.items() if k.startswith("params/")}  # SGD
    return {
        "out": ported.torch_output(out, _first_structure(ported)),
        "grads": _named(ported, new_flat, "params"),
        "buffers": _named(ported, new_flat, "batch_stats"),
        "params": _named(ported, step_params, "params"),
    }


def _named(ported: Ported, flat: dict, collection: str) -> dict[str, np.ndarray]:
    """Flat Flax arrays of one collection by their torch names, in torch's layouts."""
    return {
        m.torch_key: np.asarray(m.to_torch(np.asarray(flat[m.flax_key])))
        for m in ported.moves
        if m.flax_key.startswith(collection + "/") and m.flax_key in flat
    }


def _judge(ported: Ported, name: str, got: Any, want: Any, exact: Any, floor: float = 0.0) -> tuple[float, str | None]:
    """(max difference relative to the reference's scale floored at ``floor``, what it
    holds by: "table" for the bound ``name``, "float64" for ``train.port`` against the
    float64 step, None when neither holds)."""
    d = diffs.tree_diff(got, want)
    scale = max(d.scale, floor)
    rel = d.max_abs / scale if scale else d.max_abs
    table = tolerances.get("train.float64" if ported.dtype == torch.float64 else name)
    if table.holds(d.max_abs, scale):
        return rel, "table"
    if exact is not None:
        own, port = diffs.tree_diff(want, exact), diffs.tree_diff(got, exact)
        if tolerances.get("train.port").holds(port.max_abs, own.max_abs, scale):
            return rel, "float64"
    return rel, None


def _compare(ported: Ported, t: dict, f: dict, e: dict | None, faithful: float) -> dict:
    def pick(side, part, keys):
        return {k: side[part][k] for k in keys} if side else None

    floor = 1e-2 * max((float(np.max(np.abs(g))) for g in t["grads"].values() if g.size), default=0.0)
    running = [k for k in t["buffers"] if "running" in k]
    stepped = [k for k in t["params"] if k in t["grads"]]
    judged = {
        "out": _judge(ported, "train.logits", f["out"], t["out"], e and e["out"]),
        **{
            k: _judge(ported, "train.grads", f["grads"][k], g, e and e["grads"][k], floor)
            for k, g in t["grads"].items()
        },
        "stats": _judge(ported, "train.stats", *(pick(s, "buffers", running) for s in (f, t, e))),
        "step": _judge(ported, "train.step", *(pick(s, "params", stepped) for s in (f, t, e))),
    }
    grads = {k: judged[k] for k in t["grads"]}
    counters = all(int(f["buffers"][k]) == int(v) for k, v in t["buffers"].items() if k.endswith("num_batches_tracked"))
    checks = {
        "out": judged["out"][1] is not None,
        "grads": all(how is not None for _, how in grads.values()),
        "stats": judged["stats"][1] is not None,
        "counters": counters,
        "step": judged["step"][1] is not None,
        "trace": faithful == 0.0,
    }
    return {
        "out_max_rel_diff": judged["out"][0],
        "grad_max_rel_diff": max((r for r, _ in grads.values()), default=0.0),
        "grad_rel_diff": {k: r for k, (r, _) in grads.items()},
        "stats_max_rel_diff": judged["stats"][0],
        "step_max_rel_diff": judged["step"][0],
        "by_float64_reference": sorted(k for k, (_, how) in judged.items() if how == "float64"),
        "trace_diff": faithful,
        "checks": checks,
        "ok": all(checks.values()),
    }
