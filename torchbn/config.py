"""Model configurations for the PyTorch side, in PyTorch's conventions: the shared classes
of ``bnconfig``, as they are.

Momentum follows torch: ``running = (1 - momentum) * running + momentum * batch``,
so the default 0.1 means "10% of the new batch". ``None`` selects torch's cumulative
moving average over ``num_batches_tracked``. Images are NCHW. The Flax twins
(``flaxbn/config.py``) have the same fields with Flax's momentum direction;
``compare.conventions`` converts.
"""

from __future__ import annotations

import bnconfig
from bnconfig import KINDS, CNNConfig, CommonConfig, MLPConfig, ModelConfig, ResNetConfig

__all__ = ["KINDS", "CNNConfig", "CommonConfig", "MLPConfig", "ModelConfig", "ResNetConfig", "check_input"]


def input_problems(cfg, shape: tuple[int, ...], is_float: bool, train: bool, layout: str = "NCHW") -> list[str]:
    """Everything wrong with a model input of ``shape`` for ``cfg`` (empty when it fits)."""
    return bnconfig.input_problems(cfg, shape, is_float, train, layout)


def check_input(cfg, shape: tuple[int, ...], is_float: bool, train: bool, layout: str = "NCHW") -> None:
    """Raises one ValueError listing every problem of :func:`input_problems`."""
    bnconfig.check_input(cfg, shape, is_float, train, layout)
