"""Model configurations for the Flax side (linen and nnx), in Flax's conventions: the Flax
twin of every kind of ``bnconfig`` (:func:`twin`), with the Flax-only fields.

Momentum follows Flax: ``running = momentum * running + (1 - momentum) * batch``, so
0.9 here is torch's 0.1. (Flax's own BatchNorm default is 0.99; these configs default to
0.9 so that they match torch's default network.) Images are NHWC. The PyTorch side
(``torchbn/config.py``) has the same fields; ``compare.conventions`` converts.

``bn_semantics`` picks the BatchNorm (``flaxbn/batchnorm.py``): ``"flax"`` (default) is
stock Flax statistics (biased running variance); ``"torch"`` reproduces torch's
(unbiased running variance, and ``bn_momentum=None`` for the cumulative average).
``bn_axis_name`` is for data parallelism: None keeps per-device batch statistics (each
device normalises with its own shard's), a mesh axis name (inside ``shard_map``)
synchronises them over that axis, which equals BatchNorm over the global batch.
``bn_variance`` is how the batch variance is computed: ``"two_pass"`` (exact, as torch) or
``"shifted"`` (one pass over the activations, as accurate; ``flaxbn/batchnorm.py``).
``compute_dtype="bfloat16"`` is mixed precision: bfloat16 matmuls and convolutions,
float32 parameters and float32 BatchNorm statistics (torch's autocast, in Flax terms).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import bnconfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlaxSettings:
    """The settings only the Flax side has, and Flax's momentum direction. Keyword-only."""

    bn_momentum: float | None = 0.9
    bn_semantics: Literal["flax", "torch"] = "flax"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    bn_axis_name: str | None = None
    bn_variance: Literal["two_pass", "shifted"] = "two_pass"

    def _problems(self) -> list[str]:
        problems = super()._problems()
        axis = self.bn_axis_name
        if axis is not None and (not isinstance(axis, str) or self.bn_semantics != "flax"):
            problems.append(f"bn_axis_name must be a mesh axis name (str) with bn_semantics='flax', got {axis!r}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            problems.append(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.bn_variance not in ("two_pass", "shifted"):
            problems.append(f"bn_variance must be 'two_pass' or 'shifted', got {self.bn_variance!r}")
        if self.bn_semantics not in ("flax", "torch"):
            problems.append(f"bn_semantics must be 'flax' or 'torch', got {self.bn_semantics!r}")
        return problems

    def _momentum_problems(self) -> list[str]:
        m = self.bn_momentum
        if m is None and self.bn_semantics != "torch":
            return ["bn_momentum=None (cumulative average) needs bn_semantics='torch'"]
        if m is not None and not (isinstance(m, (int, float)) and 0.0 <= m <= 1.0):
            return [f"bn_momentum must be in [0, 1] (Flax direction: weight of the old value), got {m!r}"]
        return []


@functools.cache
def twin(kind: type[bnconfig.CommonConfig]) -> type:
    """The Flax configuration of a shared kind: the same fields, Flax's momentum default
    and direction, and the fields of :class:`FlaxSettings`."""
    cls = dataclasses.make_dataclass(kind.__name__, [], bases=(FlaxSettings, kind), frozen=True)
    cls.__module__, cls.__qualname__ = __name__, kind.__name__
    cls.__doc__ = f"{kind.__doc__.strip()}\n\nIn Flax's conventions (see ``flaxbn.config``)."
    return cls


MLPConfig = twin(bnconfig.MLPConfig)
CNNConfig = twin(bnconfig.CNNConfig)
ResNetConfig = twin(bnconfig.ResNetConfig)
ModelConfig = MLPConfig | CNNConfig | ResNetConfig
KINDS = {name: twin(kind) for name, kind in bnconfig.KINDS.items()}


def input_problems(cfg, shape: tuple[int, ...], is_float: bool, train: bool, layout: str = "NHWC") -> list[str]:
    """Everything wrong with a model input of ``shape`` for ``cfg`` (empty when it fits)."""
    return bnconfig.input_problems(cfg, shape, is_float, train, layout)


def check_input(cfg, shape: tuple[int, ...], is_float: bool, train: bool, layout: str = "NHWC") -> None:
    """Raises one ValueError listing every problem of :func:`input_problems`."""
    bnconfig.check_input(cfg, shape, is_float, train, layout)
