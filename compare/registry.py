"""Named model configurations: one name builds the same network on torch, linen and nnx.

>>> spec = get("resnet18_cifar")
>>> torch_model, linen_model = spec.build_torch(), spec.build_linen()
>>> tiny = get("resnet18").replace(width=8, num_classes=5)   # same structure, smaller
"""

from __future__ import annotations

import dataclasses

from flax import linen as nn
from flax import nnx
from torch import nn as tnn

import torchbn
from compare import conventions
from flaxbn import linen_models, nnx_models
from torchbn.config import CNNConfig, MLPConfig, ModelConfig, ResNetConfig


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A named architecture. ``config`` is in torch's conventions (the reference side);
    ``flax_config`` is its Flax twin. ``input_shape`` is one sample, torch layout."""

    name: str
    config: ModelConfig
    input_shape: tuple[int, ...]

    @property
    def flax_config(self):
        return conventions.flax_config(self.config)

    def flax_config_with(self, bn_semantics: str = "flax", compute_dtype: str = "float32", **fields):
        """The Flax twin with the chosen BatchNorm semantics ('flax' or 'torch'), compute
        dtype ('float32' or 'bfloat16') and other Flax-only fields (``bn_axis_name``)."""
        return dataclasses.replace(conventions.flax_config(self.config, bn_semantics, compute_dtype), **fields)

    @property
    def flax_input_shape(self) -> tuple[int, ...]:
        """One sample in Flax layout: (C, H, W) -> (H, W, C)."""
        if len(self.input_shape) == 3:
            c, h, w = self.input_shape
            return (h, w, c)
        return self.input_shape

    @property
    def input_rule(self) -> str:
        """Which inputs the model takes, in torch's layout (the Flax side takes the same in NHWC)."""
        cfg = self.config
        if isinstance(cfg, MLPConfig):
            return f"(N, {cfg.in_features})"
        if isinstance(cfg, CNNConfig):
            return f"(N, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}) exactly (the Linear after the flatten fixes it)"
        return f"(N, {cfg.in_channels}, H, W) with H, W >= {cfg.min_image_size} (any size above: global pooling)"

    def replace(self, **fields) -> ModelSpec:
        """The same architecture with some config fields changed (input shape follows)."""
        cfg = dataclasses.replace(self.config, **fields)
        return ModelSpec(self.name, cfg, cfg.sample_shape(self.input_shape))

    def build_torch(self) -> tnn.Module:
        return torchbn.build(self.config)

    def build_linen(self, bn_semantics: str = "flax", compute_dtype: str = "float32", **fields) -> nn.Module:
        return linen_models.build(self.flax_config_with(bn_semantics, compute_dtype, **fields))

    def build_nnx(
        self, rngs: nnx.Rngs, bn_semantics: str = "flax", compute_dtype: str = "float32", **fields
    ) -> nnx.Module:
        """The nnx model; ``rngs`` seeds its parameters and its Dropout streams (``dropout``,
        else ``default``)."""
        return nnx_models.build(self.flax_config_with(bn_semantics, compute_dtype, **fields), rngs=rngs)


_SPECS = {
    s.name: s
    for s in [
        ModelSpec("mlp", MLPConfig(in_features=784, hidden=(512, 512), num_classes=10, dropout=0.5), (784,)),
        ModelSpec("cnn", CNNConfig(in_channels=1, image_size=28, channels=(32, 64), hidden=128), (1, 28, 28)),
        ModelSpec("resnet18", ResNetConfig(layers=(2, 2, 2, 2)), (3, 224, 224)),
        ModelSpec("resnet34", ResNetConfig(layers=(3, 4, 6, 3)), (3, 224, 224)),
        ModelSpec("resnet18_cifar", ResNetConfig(layers=(2, 2, 2, 2), num_classes=10, stem="cifar"), (3, 32, 32)),
        # torchvision's Bottleneck family ("ResNet v1.5"), with torchvision's state_dict keys
        *(
            ModelSpec(name, ResNetConfig(layers=layers, block="bottleneck", groups=g, width_per_group=w), (3, 224, 224))
            for name, layers, g, w in [
                ("resnet50", (3, 4, 6, 3), 1, 64),
                ("resnet101", (3, 4, 23, 3), 1, 64),
                ("resnet152", (3, 8, 36, 3), 1, 64),
                ("wide_resnet50_2", (3, 4, 6, 3), 1, 128),
                ("wide_resnet101_2", (3, 4, 23, 3), 1, 128),
                ("resnext50_32x4d", (3, 4, 6, 3), 32, 4),
                ("resnext101_32x8d", (3, 4, 23, 3), 32, 8),
            ]
        ),
    ]
}

NAMES: tuple[str, ...] = tuple(_SPECS)


def get(name: str | ModelSpec) -> ModelSpec:
    """The spec registered under ``name`` (a spec is returned as it is)."""
    if isinstance(name, ModelSpec):
        return name
    if name not in _SPECS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(NAMES)}")
    return _SPECS[name]
