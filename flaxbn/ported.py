"""What the Flax modules that ``compare.port`` generates need beside ``flax`` and ``jax``:
torch's module tree for linen, stochastic depth, and the functions that load their weights.

* :class:`Tree` holds linen layers under torch's names (``self.layer1["0"]["conv1"]``), so
  that variables nest as torch's state_dict keys do (``params/layer1/0/conv1/kernel``);
  nnx needs nothing of the kind (``nnx.Dict``).
* :class:`LinenStochasticDepth` / :class:`NnxStochasticDepth`: torchvision's
  ``stochastic_depth``: in training, each row (``mode="row"``) or the whole batch
  (``"batch"``) is kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``; identity
  in eval. The mask comes from the ``dropout`` stream, like Dropout's.
* :func:`chunk`, :func:`split`: torch's ``chunk`` and ``split``, with its rules for sizes
  that do not divide evenly.
* :func:`load_linen` / :func:`load_nnx`: a weights file written by ``python -m compare.port``
  (safetensors, keys ``params/layer1/0/conv1/kernel``, ``batch_stats/bn1/mean``, ...).
  Float64 weights need ``jax.config.update("jax_enable_x64", True)`` first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx, traverse_util


class Tree(nn.Module):
    """One level of torch's module tree in linen: layers (and parameters) under torch's
    names, computing nothing; ``tree["0"]`` is the child named ``"0"``."""

    entries: Mapping[str, nn.Module]
    param_shapes: Mapping[str, tuple[int, ...]] = None  # name -> shape of a parameter held at this level

    def setup(self):
        for name, layer in self.entries.items():
            setattr(self, name, layer.clone())  # named by torch's name: "0", "conv1", ...
        for name, shape in (self.param_shapes or {}).items():
            setattr(self, name, self.param(name, nn.initializers.zeros, tuple(shape)))  # the weights file sets it

    def __getitem__(self, name: str):
        return getattr(self, name)


def _stochastic_depth(x: jax.Array, p: float, mode: str, batch_axis: int, key: jax.Array) -> jax.Array:
    keep = 1.0 - p
    shape = [1] * x.ndim
    if mode == "row":
        shape[batch_axis] = x.shape[batch_axis]
    noise = jax.random.bernoulli(key, keep, shape).astype(x.dtype)
    if keep > 0.0:
        noise = noise / keep  # as torchvision: the mask is scaled, then multiplies the input
    return x * noise


def _check(p: float, mode: str) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability has to be between 0 and 1, but got {p}")
    if mode not in ("row", "batch"):
        raise ValueError(f"mode has to be either 'batch' or 'row', but got {mode}")


class LinenStochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth(p, mode)``; ``batch_axis`` is where the rows are."""

    p: float
    mode: str = "row"
    batch_axis: int = 0
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        _check(self.p, self.mode)
        if nn.merge_param("deterministic", self.deterministic, deterministic) or self.p == 0.0:
            return x
        return _stochastic_depth(x, self.p, self.mode, self.batch_axis, self.make_rng("dropout"))


class NnxStochasticDepth(nnx.Module):
    """torchvision's ``StochasticDepth(p, mode)``; ``model.train()`` / ``model.eval()``
    switch it through ``deterministic``, as for ``nnx.Dropout``."""

    def __init__(
        self,
        p: float,
        mode: str = "row",
        *,
        batch_axis: int = 0,
        deterministic: bool = False,
        rngs: nnx.Rngs | None = None,
    ):
        _check(p, mode)
        self.p, self.mode, self.batch_axis, self.deterministic = p, mode, batch_axis, deterministic
        self.rngs = rngs["dropout"].fork() if rngs is not None else nnx.data(None)

    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        if (self.deterministic if deterministic is None else deterministic) or self.p == 0.0:
            return x
        if self.rngs is None:
            raise ValueError("NnxStochasticDepth needs rngs (a 'dropout' or 'default' stream) to train")
        return _stochastic_depth(x, self.p, self.mode, self.batch_axis, self.rngs())


def chunk(x: jax.Array, chunks: int, axis: int) -> tuple[jax.Array, ...]:
    """torch's ``chunk``: pieces of ``ceil(size / chunks)``, the last one smaller (or fewer pieces)."""
    size = x.shape[axis]
    step = max(math.ceil(size / chunks), 1)
    return tuple(jnp.split(x, list(range(step, size, step)), axis=axis))


def split(x: jax.Array, split_size_or_sections: int | Sequence[int], axis: int) -> tuple[jax.Array, ...]:
    """torch's ``split``: pieces of a given size (the last one smaller) or of given sizes."""
    size = x.shape[axis]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        return tuple(jnp.split(x, list(range(step, size, step)), axis=axis))
    sections = list(split_size_or_sections)
    if sum(sections) != size:
        raise ValueError(f"split sizes {sections} do not add up to {size} (dimension {axis})")
    bounds = [sum(sections[: i + 1]) for i in range(len(sections) - 1)]
    return tuple(jnp.split(x, bounds, axis=axis))


# --- weights ---------------------------------------------------------------------------------


def _read(path: str | Path) -> dict[str, jax.Array]:
    from safetensors.numpy import load_file  # a dependency of the weights files only

    return {k: jnp.asarray(v) for k, v in load_file(str(path)).items()}


def load_linen(path: str | Path) -> dict:
    """The linen variables ``{"params": ..., "batch_stats": ...}`` of a weights file."""
    nested = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in _read(path).items()})
    return {"params": {}, "batch_stats": {}, **nested}


def new_nnx(cls: type, seed: int = 0, **kwargs) -> nnx.Module:
    """An nnx model of a generated class without its random initialisation (every weight
    is overwritten next, by :func:`load_nnx` or ``compare.port``): built abstractly, with
    concrete ``dropout`` streams from ``seed``."""
    model = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(seed), **kwargs))
    streams = []
    for i, (keys, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.RngState))):
        dtype = var.get_value().dtype
        value = jax.random.fold_in(jax.random.key(seed), i) if isinstance(var, nnx.RngKey) else jnp.zeros((), dtype)
        streams.append((keys, var.replace(value)))
    if streams:
        nnx.update(model, nnx.from_flat_state(streams))
    return model


def load_nnx(model: nnx.Module | type, path: str | Path) -> nnx.Module:
    """Write a weights file into ``model`` (every key and shape must match) and return it;
    given the generated class instead, the model is made by :func:`new_nnx` first."""
    if isinstance(model, type):
        model = new_nnx(model)
    flat = _read(path)
    current = {}
    for keys, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        collection = "params" if isinstance(var, nnx.Param) else "batch_stats"
        current["/".join([collection, *map(str, keys)])] = (keys, var)
    problems = [f"missing key {k!r}" for k in current if k not in flat]
    problems += [f"unexpected key {k!r}" for k in flat if k not in current]
    problems += [
        f"shape mismatch at {k!r}: expected {var.get_value().shape}, got {flat[k].shape}"
        for k, (_, var) in current.items()
        if k in flat and flat[k].shape != var.get_value().shape
    ]
    if problems:
        raise ValueError(f"{path}: {len(problems)} problem(s), nothing was loaded: " + "; ".join(problems))
    nnx.update(model, nnx.from_flat_state([(keys, var.replace(flat[k])) for k, (keys, var) in current.items()]))
    return model
