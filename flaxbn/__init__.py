"""Flax side: the same networks in ``flax.linen`` and ``flax.nnx``, in Flax's conventions
(NHWC, ``momentum=0.9`` for torch's 0.1). Imports jax, flax and optax only; never torch
or ``compare``."""

from flaxbn import linen_models, nnx_models, parallel
from flaxbn.batchnorm import (
    LinenBatchNorm,
    LinenOnePassBatchNorm,
    LinenTorchBatchNorm,
    NnxBatchNorm,
    NnxOnePassBatchNorm,
    NnxTorchBatchNorm,
)
from flaxbn.config import CNNConfig, MLPConfig, ModelConfig, ResNetConfig

__version__ = "0.2.0"  # the same in torchbn, flaxbn and compare (one distribution)

__all__ = [
    "CNNConfig",
    "LinenBatchNorm",
    "LinenOnePassBatchNorm",
    "LinenTorchBatchNorm",
    "MLPConfig",
    "ModelConfig",
    "NnxBatchNorm",
    "NnxOnePassBatchNorm",
    "NnxTorchBatchNorm",
    "ResNetConfig",
    "__version__",
    "linen_models",
    "nnx_models",
    "parallel",
]
