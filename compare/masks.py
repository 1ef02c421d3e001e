"""Mask injection: dropout masks drawn once and fed to torch, linen and nnx alike.

The frameworks cannot draw the same random masks (different generators), so exact
train-mode comparisons replace every Dropout's draw with a given keep-mask, applied the
same way everywhere: ``where(keep, x / (1 - p), 0)``. The normal random path of the
models is untouched; injection is a context around a call.

A mask is ``(N, F)`` for element-wise dropout and ``(N, C)`` for channel-wise dropout
(torch ``Dropout2d``; Flax ``broadcast_dims=(1, 2)``), broadcast over H and W on each side
in its own layout. Masks are matched to layers by name, which is the same on every side
(``drop1``, ``drop``, ``dropout``: torch's module path, linen's module path, nnx's attribute path).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import linen as nn
from flax import nnx


@dataclasses.dataclass(frozen=True)
class DropoutSite:
    name: str  # torch/nnx attribute path, e.g. "drop1"
    rate: float
    channelwise: bool
    mask_shape: tuple[int, ...]  # (N, F) or (N, C)


def sites(model: torch.nn.Module, x: torch.Tensor) -> list[DropoutSite]:
    """The dropout layers of a torch model in call order, with the mask shape for input ``x``."""
    found, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):

            def record(m, inputs, output, name=name):
                shape = tuple(inputs[0].shape)
                channelwise = isinstance(m, torch.nn.Dropout2d)
                found.append(DropoutSite(name, m.p, channelwise, shape[:2] if channelwise else shape))

            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return found


def draw(site_list: Sequence[DropoutSite], rng: np.random.Generator) -> list[np.ndarray]:
    """One boolean keep-mask per site, P(keep) = 1 - rate."""
    return [rng.random(s.mask_shape) >= s.rate for s in site_list]


def _apply(x, keep, rate: float, where, zeros_like):
    if rate >= 1.0:
        return zeros_like(x)
    return where(keep, x / (1.0 - rate), zeros_like(x))


# --- torch ---------------------------------------------------------------------------------


@contextlib.contextmanager
def inject_torch(
    model: torch.nn.Module, site_list: Sequence[DropoutSite], masks: Sequence[np.ndarray]
) -> Iterator[None]:
    """Within the context, each torch dropout (in train mode) applies its given mask."""
    modules = dict(model.named_modules())
    hooks = []
    for site, keep in zip(site_list, masks, strict=True):
        keep_t = torch.from_numpy(np.asarray(keep))
        if site.channelwise:
            keep_t = keep_t[:, :, None, None]  # (N, C) -> (N, C, 1, 1)

        def replace(m, inputs, output, keep_t=keep_t, rate=site.rate):
            if not m.training:
                return output
            x = inputs[0]
            return _apply(x, keep_t.to(x.device), rate, torch.where, torch.zeros_like)

        hooks.append(modules[site.name].register_forward_hook(replace))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# --- linen ---------------------------------------------------------------------------------


def _flax_keep(keep: jax.Array, channelwise: bool) -> jax.Array:
    return keep[:, None, None, :] if channelwise else keep  # (N, C) -> (N, 1, 1, C)


def linen_masked_apply(model: nn.Module, site_list: Sequence[DropoutSite], masks: Sequence[jax.Array]):
    """``model.apply`` whose Dropout layers apply ``masks`` (matched by module path). Works
    under ``jax.jit`` with the masks as traced arguments."""
    by_name = {}
    for site, keep in zip(site_list, masks, strict=True):
        if site.name in by_name:
            raise ValueError(f"two masks for {site.name!r}")
        by_name[site.name] = (site, keep)

    def apply(variables, *args, **kwargs):
        used = set()

        def interceptor(next_fun, call_args, call_kwargs, context):
            module = context.module
            if not isinstance(module, nn.Dropout) or context.method_name != "__call__":
                return next_fun(*call_args, **call_kwargs)
            deterministic = call_kwargs.get("deterministic", module.deterministic)
            if deterministic:
                return next_fun(*call_args, **call_kwargs)
            name = ".".join(module.path)
            if name not in by_name:
                raise KeyError(f"linen Dropout {name!r} has no mask; masks are for {sorted(by_name)}")
            site, keep = by_name[name]
            used.add(name)
            x = call_args[0]
            return _apply(x, _flax_keep(jnp.asarray(keep), site.channelwise), site.rate, jnp.where, jnp.zeros_like)

        with nn.intercept_methods(interceptor):
            out = model.apply(variables, *args, **kwargs)
        if kwargs.get("train") and used != set(by_name):
            raise RuntimeError(f"masks for dropouts that were never called: {sorted(set(by_name) - used)}")
        return out

    return apply


# --- nnx -----------------------------------------------------------------------------------


class InjectedMask(nnx.Variable):
    """A keep-mask held by :class:`MaskedDropout`: state, so ``nnx.jit`` does not retrace."""


class MaskedDropout(nnx.Module):
    """Stands in for an ``nnx.Dropout``: applies its ``keep`` mask in training."""

    def __init__(self, rate: float, keep: jax.Array, channelwise: bool):
        self.rate, self.channelwise, self.deterministic = rate, channelwise, False
        self.keep = InjectedMask(jnp.asarray(keep))

    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        if self.deterministic if deterministic is None else deterministic:
            return x
        return _apply(x, _flax_keep(self.keep[...], self.channelwise), self.rate, jnp.where, jnp.zeros_like)


def _parent_and_name(model: nnx.Module, path: str):
    *parents, name = path.split(".")
    for p in parents:
        model = model[int(p)] if p.isdigit() else getattr(model, p)
    return model, name


@contextlib.contextmanager
def inject_nnx(model: nnx.Module, site_list: Sequence[DropoutSite], masks: Sequence[np.ndarray]) -> Iterator[None]:
    """Within the context, each nnx Dropout is swapped for a :class:`MaskedDropout`;
    :func:`set_nnx_masks` changes the masks between steps. The originals come back after."""
    originals = []
    for site, keep in zip(site_list, masks, strict=True):
        parent, name = _parent_and_name(model, site.name)
        original = getattr(parent, name)
        if not isinstance(original, nnx.Dropout):
            raise TypeError(f"{site.name} is a {type(original).__name__}, not an nnx.Dropout")
        originals.append((parent, name, original))
        setattr(parent, name, MaskedDropout(site.rate, keep, site.channelwise))
    try:
        yield
    finally:
        for parent, name, original in originals:
            setattr(parent, name, original)


def set_nnx_masks(model: nnx.Module, site_list: Sequence[DropoutSite], masks: Sequence[np.ndarray]) -> None:
    for site, keep in zip(site_list, masks, strict=True):
        parent, name = _parent_and_name(model, site.name)
        getattr(parent, name).keep[...] = jnp.asarray(keep)
