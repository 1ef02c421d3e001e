"""Validation of transfer inputs: every missing or unexpected key, wrong shape, wrong dtype
and non-finite value, listed at once in one :class:`TransferError`, before anything is
written."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

PREFIXES = ("_orig_mod.", "module.")


class TransferError(ValueError):
    """A transfer input that does not fit the model. ``problems`` lists every one, each
    naming the layer or key; ``file`` is the file the input came from, when there is one."""

    def __init__(self, what: str, problems: list[str], file: str | None = None, hint: str | None = None):
        self.what, self.problems, self.file, self.hint = what, list(problems), None if file is None else str(file), hint
        lines = "\n".join(f"  - {p}" for p in self.problems) + (f"\n  {hint}" if hint else "")
        where = f"{self.file}: " if self.file else ""
        super().__init__(f"{where}{what}: {len(self.problems)} problem(s), nothing was loaded:\n{lines}")

    def with_file(self, file) -> TransferError:
        """The same error, naming the file its input came from."""
        return type(self)(self.what, self.problems, file, self.hint)


class CustomPortError(TransferError, KeyError, NotImplementedError):
    """A network that :func:`compare.transfer.custom` cannot port as described: paths that
    name no module, layers without a rule, a wrong or missing ``flatten=``, a Flax twin of
    the wrong kind. A :class:`TransferError`; also a ``KeyError`` and a
    ``NotImplementedError``, which 0.2 raised for these."""

    __str__ = ValueError.__str__  # KeyError would print the message's repr


def strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop ``_orig_mod.`` / ``module.`` (in any nesting) when every key carries it."""
    sd = dict(state_dict)
    changed = True
    while changed and sd:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def _kind(x: Any) -> str:
    """'float', 'int' or the dtype's name, for torch tensors and array-likes alike."""
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point:
            return "float"
        return "int" if not x.dtype.is_complex and x.dtype != torch.bool else str(x.dtype)
    dtype = np.asarray(x).dtype if not hasattr(x, "dtype") else np.dtype(x.dtype)
    if dtype.name == "bfloat16" or np.issubdtype(dtype, np.floating):
        return "float"
    return "int" if np.issubdtype(dtype, np.integer) else dtype.name


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _numpy(x: Any) -> np.ndarray:
    """float16/bfloat16 -> float32 (exact); torch and jax arrays -> numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    a = np.asarray(x)
    return a.astype(np.float32) if a.dtype.name in ("bfloat16", "float16") else a


def validate(
    given: Mapping[str, Any], expected: Mapping[str, tuple[tuple[int, ...], str]], allow_nonfinite: bool
) -> list[str]:
    """Every problem of ``given`` against ``expected`` = {key: (shape, dtype)}: keys, shapes,
    dtypes, non-finite values. dtype: a kind ('float', 'int') or an exact name ('float32')."""
    problems = [f"missing key '{k}' (expected shape {expected[k][0]})" for k in expected if k not in given]
    problems += [f"unexpected key '{k}' (shape {_shape(given[k])})" for k in given if k not in expected]
    for key, (shape, kind) in expected.items():
        if key not in given:
            continue
        value = given[key]
        got_shape, got_kind = _shape(value), _kind(value)
        if got_shape != shape:
            problems.append(f"shape mismatch at '{key}': expected {shape}, got {got_shape}")
        if kind not in ("float", "int"):
            got_dtype = str(getattr(value, "dtype", type(value).__name__))
            if got_dtype != kind:
                problems.append(f"dtype mismatch at '{key}': expected {kind}, got {got_dtype}")
            elif got_kind == "float" and not allow_nonfinite and not np.isfinite(_numpy(value)).all():
                problems.append(f"non-finite values at '{key}'")
            continue
        if got_kind != kind:
            want = "a floating-point" if kind == "float" else "an integer"
            problems.append(
                f"dtype mismatch at '{key}': expected {want} tensor, got {getattr(value, 'dtype', type(value))}"
            )
        elif kind == "float" and not allow_nonfinite:
            finite = np.isfinite(_numpy(value))
            if not finite.all():
                problems.append(
                    f"non-finite values at '{key}': {finite.size - int(finite.sum())} of {finite.size}"
                    " (pass allow_nonfinite=True to keep them)"
                )
        elif kind == "int" and got_shape == shape:
            n = int(_numpy(value))
            if not 0 <= n < 2**31:
                problems.append(f"'{key}' = {n} is outside [0, 2**31) and does not fit Flax's int32 counter")
    return problems
