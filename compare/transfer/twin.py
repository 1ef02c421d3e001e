"""A hand-written Flax twin, checked against the torch network it ports before any weight
moves: the same variables (paths, shapes) as the weight map says, and BatchNorm layers
that can hold torch's state.

Stock ``flax.linen.BatchNorm`` and ``flax.nnx.BatchNorm`` have no ``num_batches_tracked``:
the torch counter has nowhere to go (nnx: one error per layer; linen: it runs, and a model
trained in Flax goes back to torch with a stale counter, which matters for
``momentum=None``). ``flaxbn``'s BatchNorms are stock Flax plus that counter
(``LinenBatchNorm``, ``NnxBatchNorm``) or torch's statistics (``LinenTorchBatchNorm``,
``NnxTorchBatchNorm``: the unbiased running variance, ``momentum=None``), so the message
names them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx, traverse_util

import flaxbn
from compare import conventions
from compare.registry import ModelSpec
from compare.transfer.moves import _nnx_flat_variables
from compare.transfer.rules import _COUNT, Port, flax_expected, resolve
from compare.transfer.validation import CustomPortError

_FLAXBN = {
    "nnx": (flaxbn.NnxBatchNorm, flaxbn.NnxTorchBatchNorm, flaxbn.NnxOnePassBatchNorm),
    "linen": (flaxbn.LinenBatchNorm, flaxbn.LinenTorchBatchNorm, flaxbn.LinenOnePassBatchNorm),
}
_STOCK = {"nnx": nnx.BatchNorm, "linen": nn.BatchNorm}


def _advice(api: str, path: str) -> str:
    prefix = "Nnx" if api == "nnx" else "Linen"
    return (
        f"'{path}' is a stock flax.{api}.BatchNorm, which has no num_batches_tracked to hold torch's counter: use "
        f"flaxbn.{prefix}BatchNorm (Flax's statistics plus the counter) or flaxbn.{prefix}TorchBatchNorm (torch's "
        "statistics: unbiased running variance, momentum=None), with momentum=0.9 (torch's 0.1) and epsilon=1e-5"
    )


def stock_batchnorms(api: str, types: dict[str, type]) -> dict[str, str]:
    """{layer path: problem} for every stock Flax BatchNorm among ``types`` ({path: type})."""
    return {
        path: _advice(api, path)
        for path, kind in types.items()
        if issubclass(kind, _STOCK[api]) and not issubclass(kind, _FLAXBN[api])
    }


def nnx_module_types(model: nnx.Module) -> dict[str, type]:
    """{dotted path: type} of every module in an nnx model."""
    return {
        ".".join(map(str, path)): type(node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)
    }


def _linen_init(module: nn.Module, x: np.ndarray) -> tuple[dict, dict[str, type]]:
    """Abstract variables (nothing is allocated) and {dotted path: type} of a linen twin,
    called as ``module(x, train=False)`` (or ``module(x)``) on ``x`` in Flax's layout."""
    types: dict[str, type] = {}

    def record(next_fun, args, kwargs, context):
        types[".".join(context.module.path)] = type(context.module)
        return next_fun(*args, **kwargs)

    xs = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    for kwargs in ({"train": False}, {}):
        try:
            with nn.intercept_methods(record):
                variables = jax.eval_shape(lambda x, kw=kwargs: module.init(jax.random.key(0), x, **kw), xs)
            return variables, types
        except TypeError as e:
            if "train" not in str(e) or not kwargs:
                raise
    raise AssertionError("unreachable")


def check_twin(spec: ModelSpec | Port | str, twin: Any, example_input: np.ndarray | None = None) -> None:
    """Raise one :class:`~compare.transfer.CustomPortError` listing every way the Flax
    ``twin`` (an nnx model, or a linen module with ``example_input`` in torch's layout)
    differs from what the weight map of ``spec`` moves into it: missing and unexpected
    variables, shapes, and stock Flax BatchNorms (with the BatchNorm to use instead)."""
    spec = resolve(spec)
    if isinstance(twin, nnx.Module):
        api, types = "nnx", nnx_module_types(twin)
        shapes = {k: tuple(var.get_value().shape) for k, (_, var) in _nnx_flat_variables(twin).items()}
    elif isinstance(twin, nn.Module):
        if example_input is None:
            raise TypeError("check_twin: a linen twin needs example_input (one batch in torch's layout) to be traced")
        api = "linen"
        variables, types = _linen_init(twin, conventions.to_flax_input(np.asarray(example_input)))
        variables = {c: v for c, v in variables.items() if c in ("params", "batch_stats")}
        shapes = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
    else:
        raise TypeError(f"check_twin: expected an nnx.Module or a linen Module, got {type(twin).__name__}")
    stock = stock_batchnorms(api, types)
    explained = {f"batch_stats/{path.replace('.', '/')}/{_COUNT}" for path in stock}
    expected = {k: shape for k, (shape, _) in flax_expected(spec).items()}
    problems = list(stock.values())
    problems += [
        f"missing in the twin: '{k}' (shape {expected[k]})" for k in expected if k not in shapes and k not in explained
    ]
    problems += [f"unexpected in the twin: '{k}' (shape {shapes[k]})" for k in shapes if k not in expected]
    problems += [
        f"shape mismatch at '{k}': the weight map gives {expected[k]}, the twin has {shapes[k]}"
        for k in expected
        if k in shapes and shapes[k] != expected[k]
    ]
    if problems:
        raise CustomPortError(f"Flax twin {type(twin).__name__} ({api}) of '{spec.name}'", problems)
