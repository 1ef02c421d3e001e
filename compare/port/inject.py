"""The same dropout and stochastic-depth masks on both sides of a port, for exact
train-mode comparisons (the frameworks cannot draw the same random numbers).

Every random node of the train-mode trace is a :class:`~compare.port.ops.values.Site`
with a keep-mask shape in torch's layout (element-wise: the input's shape; Dropout2d:
``(N, C, 1, 1)``; stochastic depth: ``(N, 1, 1, 1)`` per row or ``(1, 1, 1, 1)`` per
batch). Both sides then compute ``where(keep, x / (1 - p), 0)``, the formula of
``compare.masks``:

* torch: the train-mode trace itself (it shares the model's parameters and buffers), with
  each random node replaced by that formula. fx traces are the torch code that ran;
  :func:`trace_is_faithful` checks that the trace and the model give the same train-mode
  output bit for bit from the same torch seed;
* linen: an interceptor on the generated Dropout and stochastic-depth layers, by path;
* nnx: those layers swapped for masked ones, by path, for the duration of a context.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn
from flax import nnx
from torch import fx

from compare.masks import InjectedMask
from compare.port import layout, ops
from compare.port.ops.values import Site
from compare.port.trace import preserved
from flaxbn import ported as flax_ported


def draw(sites: Sequence[Site], rng: np.random.Generator) -> list[np.ndarray]:
    """One boolean keep-mask per site, P(keep) = 1 - rate, in torch's layout."""
    return [rng.random(s.mask_shape) >= s.rate for s in sites]


def _apply(x, keep, rate: float, where, zeros_like):
    return zeros_like(x) if rate >= 1.0 else where(keep, x / (1.0 - rate), zeros_like(x))


def keep_where(x: torch.Tensor, keep: torch.Tensor, rate: float) -> torch.Tensor:
    """torch's side of a masked random node (a plain function, so that fx can call it)."""
    return _apply(x, keep, rate, torch.where, torch.zeros_like)


# --- torch -------------------------------------------------------------------------------------


def torch_masked(ported, masks: Sequence[np.ndarray]) -> fx.GraphModule:
    """The train-mode trace with each random node applying its mask (the model's own
    parameters and buffers: a forward updates its statistics, a backward fills its grads)."""
    gm = ported.traced_train.gm
    masked = fx.GraphModule(gm, copy.deepcopy(gm.graph), "masked")
    modules = dict(gm.named_modules())
    by_node = {s.node: (i, s) for i, s in enumerate(ported.sites)}
    for node in list(masked.graph.nodes):
        if node.name not in by_node:
            continue
        i, site = by_node[node.name]
        masked.register_buffer(f"port_mask_{i}", torch.from_numpy(np.asarray(masks[i])))
        x = ops.lookup(node, modules).args["input"]
        with masked.graph.inserting_before(node):
            keep = masked.graph.get_attr(f"port_mask_{i}")
            new = masked.graph.call_function(keep_where, (x, keep, site.rate))
        node.replace_all_uses_with(new)
        masked.graph.erase_node(node)
    masked.recompile()
    return masked


def trace_is_faithful(ported, x: torch.Tensor, seed: int = 0) -> float:
    """max |model(x) - trace(x)| in train mode from the same torch seed (the same random
    draws in the same order): 0.0 when the trace is the code that ran. The model's
    statistics and torch's random state are left as they were."""
    model, gm = ported.torch_model, ported.traced_train.gm
    outs = []
    for run in (model, gm):
        with preserved(model), torch.no_grad():
            model.train()
            torch.manual_seed(seed)
            outs.append([t for t in jax.tree.leaves(run(x)) if isinstance(t, torch.Tensor)])
    return max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(*outs, strict=True))


# --- linen -------------------------------------------------------------------------------------


def flax_masks(sites: Sequence[Site], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The masks in the Flax layouts of their layers' inputs."""
    return [layout.to_flax(np.asarray(m), s.layout) for s, m in zip(sites, masks, strict=True)]


def linen_apply(ported, masks: Sequence[jax.Array]):
    """``ported.module.apply`` whose random layers apply ``masks`` (Flax layouts, see
    :func:`flax_masks`); works under ``jax.jit`` with the masks as traced arguments."""
    by_path = {s.path: (s, keep) for s, keep in zip(ported.sites, masks, strict=True)}
    random = (nn.Dropout, flax_ported.LinenStochasticDepth)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, random) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if kwargs.get("deterministic", module.deterministic):
            return next_fun(*args, **kwargs)
        site, keep = by_path[".".join(module.path)]
        return _apply(args[0], jnp.asarray(keep), site.rate, jnp.where, jnp.zeros_like)

    def apply(variables, *args, **kwargs):
        with nn.intercept_methods(interceptor):
            return ported.module.apply(variables, *args, **kwargs)

    return apply


# --- nnx ---------------------------------------------------------------------------------------


class MaskedLayer(nnx.Module):
    """Stands in for a generated Dropout or stochastic-depth layer: applies ``keep`` in training."""

    def __init__(self, rate: float, keep: jax.Array):
        self.rate, self.deterministic = rate, False
        self.keep = InjectedMask(jnp.asarray(keep))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic:
            return x
        return _apply(x, self.keep[...], self.rate, jnp.where, jnp.zeros_like)


def _parent(model: nnx.Module, path: str):
    first, *rest = path.split(".")
    if not rest:
        return model, first
    parent = getattr(model, first)
    for part in rest[:-1]:
        parent = parent[part]
    return parent, rest[-1]


def _get(parent, name: str):
    return (
        getattr(parent, name) if isinstance(parent, nnx.Module) and not isinstance(parent, nnx.Dict) else parent[name]
    )


def _set(parent, name: str, value) -> None:
    if isinstance(parent, nnx.Dict):
        parent[name] = value
    else:
        setattr(parent, name, value)


@contextlib.contextmanager
def nnx_masked(model: nnx.Module, sites: Sequence[Site], masks: Sequence[jax.Array]) -> Iterator[None]:
    """Within the context, the random layers of ``model`` apply ``masks`` (Flax layouts)."""
    originals = []
    for site, keep in zip(sites, masks, strict=True):
        parent, name = _parent(model, site.path)
        originals.append((parent, name, _get(parent, name)))
        _set(parent, name, MaskedLayer(site.rate, keep))
    try:
        yield
    finally:
        for parent, name, original in originals:
            _set(parent, name, original)
