"""PyTorch side: BatchNorm + Dropout networks in torch's own conventions (NCHW, momentum=0.1).

Imports torch and numpy only; never jax, flax or ``compare``.
"""

from torchbn.batchnorm import SyncBatchNorm, convert_sync_batchnorm
from torchbn.config import CNNConfig, MLPConfig, ModelConfig, ResNetConfig
from torchbn.models import CNN, MLP, BasicBlock, Bottleneck, ResNet, build

__version__ = "0.2.0"  # the same in torchbn, flaxbn and compare (one distribution)

__all__ = [
    "CNN",
    "MLP",
    "BasicBlock",
    "Bottleneck",
    "CNNConfig",
    "MLPConfig",
    "ModelConfig",
    "ResNet",
    "ResNetConfig",
    "SyncBatchNorm",
    "__version__",
    "build",
    "convert_sync_batchnorm",
]
