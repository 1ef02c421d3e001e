"""Flax side: the same networks in ``flax.linen`` and ``flax.nnx``, in Flax's conventions
(NHWC, ``momentum=0.9`` for torch's 0.1). Imports jax, flax and optax only; never torch
or ``compare``."""

from flaxbn import linen_models, nnx_models
from flaxbn.batchnorm import LinenBatchNorm, LinenTorchBatchNorm, NnxBatchNorm, NnxTorchBatchNorm
from flaxbn.config import CNNConfig, MLPConfig, ModelConfig, ResNetConfig

__all__ = [
    "CNNConfig",
    "LinenBatchNorm",
    "LinenTorchBatchNorm",
    "MLPConfig",
    "ModelConfig",
    "NnxBatchNorm",
    "NnxTorchBatchNorm",
    "ResNetConfig",
    "linen_models",
    "nnx_models",
]
