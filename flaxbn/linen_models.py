"""MLP, CNN and ResNet in ``flax.linen``: the twins of ``torchbn/models.py``.

Images are NHWC. The mode is an argument, ``__call__(x, *, train)``, as in Flax's
imagenet example: BatchNorm uses ``use_running_average=not train`` and Dropout
``deterministic=not train``. Mutable state is visible at the call site::

    logits, updates = model.apply(variables, x, train=True,
                                  rngs={"dropout": key}, mutable=["batch_stats"])
    logits = model.apply(variables, x, train=False)   # eval: no rng, nothing mutable

Layer names equal torch's (``fc1``, ``bn1``, ``drop1``, ``layer1/0/bn2``,
``layer2/0/downsample/1``), so the weight map in ``compare.transfer`` is mechanical; the
helpers and classes are those of ``torchbn/models.py``, in the same order. Convolutions
state their padding explicitly: Flax's default ``'SAME'`` differs from torch's for stride 2.
torch's default inits differ (kaiming-uniform); transferred weights make that moot, and
models trained from scratch keep Flax's defaults.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from flaxbn.batchnorm import LinenBatchNorm, LinenOnePassBatchNorm, LinenTorchBatchNorm
from flaxbn.config import CNNConfig, MLPConfig, ModelConfig, ResNetConfig, check_input
from flaxbn.pooling import max_pool_2x2

# --- layers, configured once ------------------------------------------------------------------


def _check(cfg: ModelConfig, x: jax.Array, train: bool) -> None:
    check_input(cfg, tuple(x.shape), jnp.issubdtype(x.dtype, jnp.floating), train)


def _dtype(cfg: ModelConfig) -> jnp.dtype | None:
    """Compute dtype of matmuls and convolutions (parameters stay float32): bfloat16, or
    None for "float32", which lets Flax follow the inputs and parameters (float64 too)."""
    return jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None


def _batch_norm(cfg: ModelConfig, *, train: bool, name: str, zero_scale: bool = False) -> nn.Module:
    """Normalises the last axis (features or channels, NHWC); statistics stay float32.
    ``zero_scale``: the scale starts at 0 (a residual block's last BatchNorm under
    ``zero_init_residual``)."""
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    if cfg.bn_semantics == "torch":
        return LinenTorchBatchNorm(
            use_running_average=not train,
            momentum=cfg.bn_momentum,
            epsilon=cfg.bn_eps,
            variance=cfg.bn_variance,
            scale_init=scale_init,
            name=name,
        )
    if cfg.bn_variance == "shifted":
        return LinenOnePassBatchNorm(
            use_running_average=not train,
            momentum=cfg.bn_momentum,
            epsilon=cfg.bn_eps,
            axis_name=cfg.bn_axis_name,
            dtype=_dtype(cfg),
            scale_init=scale_init,
            name=name,
        )
    return LinenBatchNorm(
        use_running_average=not train,
        momentum=cfg.bn_momentum,
        epsilon=cfg.bn_eps,
        use_fast_variance=False,  # two-pass variance, as torch computes it
        axis_name=cfg.bn_axis_name,  # None: per-device statistics
        dtype=_dtype(cfg),  # statistics stay float32 (force_float32_reductions)
        scale_init=scale_init,
        name=name,
    )


def _conv(
    cfg: ModelConfig,
    features: int,
    *,
    kernel: int,
    stride: int = 1,
    padding: int,
    groups: int = 1,
    bias: bool = False,
    name: str,
) -> nn.Conv:
    pad = ((padding, padding), (padding, padding))  # torch's symmetric padding, never 'SAME'
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        feature_group_count=groups,  # torch's groups
        use_bias=bias,
        dtype=_dtype(cfg),
        name=name,
    )


def _linear(cfg: ModelConfig, features: int, *, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=_dtype(cfg), name=name)


def _dropout(rate: float, *, channelwise: bool = False, train: bool, name: str) -> nn.Dropout:
    """Element-wise, or channel-wise (broadcast over H and W: one mask value per (sample,
    channel), like torch's Dropout2d)."""
    return nn.Dropout(rate, broadcast_dims=(1, 2) if channelwise else (), deterministic=not train, name=name)


# --- models -----------------------------------------------------------------------------------


class MLP(nn.Module):
    """``fc{i} -> bn{i} -> relu -> drop{i}`` for each hidden width, then ``head``."""

    cfg: MLPConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """(N, in_features) -> (N, num_classes) logits."""
        cfg = self.cfg
        _check(cfg, x, train)
        for i, width in enumerate(cfg.hidden, start=1):
            x = _linear(cfg, width, name=f"fc{i}")(x)
            if cfg.use_bn:
                x = _batch_norm(cfg, train=train, name=f"bn{i}")(x)
            x = _dropout(cfg.dropout, train=train, name=f"drop{i}")(nn.relu(x))
        return _linear(cfg, cfg.num_classes, name="head")(x)


class CNN(nn.Module):
    """``conv{i} -> bn{i} -> relu -> max_pool 2 -> drop{i}`` (channel-wise), then
    ``flatten -> fc -> fc_bn -> relu -> drop -> head``."""

    cfg: CNNConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """(N, H, W, C) -> (N, num_classes) logits."""
        cfg = self.cfg
        _check(cfg, x, train)
        for i, c_out in enumerate(cfg.channels, start=1):
            x = _conv(cfg, c_out, kernel=3, padding=1, bias=not cfg.use_bn, name=f"conv{i}")(x)
            if cfg.use_bn:
                x = _batch_norm(cfg, train=train, name=f"bn{i}")(x)
            x = max_pool_2x2(nn.relu(x))  # torch's MaxPool2d(2), fast on XLA:CPU (flaxbn/pooling.py)
            x = _dropout(cfg.dropout2d, channelwise=True, train=train, name=f"drop{i}")(x)
        x = x.reshape(x.shape[0], -1)  # (N, H, W, C) -> (N, H*W*C), channel-minor
        x = _linear(cfg, cfg.hidden, name="fc")(x)
        if cfg.use_bn:
            x = _batch_norm(cfg, train=train, name="fc_bn")(x)
        x = _dropout(cfg.dropout, train=train, name="drop")(nn.relu(x))
        return _linear(cfg, cfg.num_classes, name="head")(x)


class Downsample(nn.Module):
    """torch's ``nn.Sequential(conv1x1, bn)``: submodules named ``0`` and ``1``."""

    cfg: ResNetConfig
    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = _conv(self.cfg, self.features, kernel=1, stride=self.stride, padding=0, name="0")(x)
        return _batch_norm(self.cfg, train=train, name="1")(x)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs, identity or 1x1 ``downsample`` shortcut."""

    cfg: ResNetConfig
    features: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        cfg, features = self.cfg, self.features
        identity = x
        if self.stride != 1 or x.shape[-1] != features:
            identity = Downsample(cfg, features, self.stride, name="downsample")(x, train=train)
        out = _conv(cfg, features, kernel=3, stride=self.stride, padding=1, name="conv1")(x)
        out = nn.relu(_batch_norm(cfg, train=train, name="bn1")(out))
        out = _conv(cfg, features, kernel=3, padding=1, name="conv2")(out)
        zero = cfg.zero_init_residual
        return nn.relu(_batch_norm(cfg, train=train, name="bn2", zero_scale=zero)(out) + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck ("ResNet v1.5"): 1x1, grouped 3x3 with the stride, 1x1 up to
    ``features * 4``, identity or 1x1 ``downsample`` shortcut."""

    cfg: ResNetConfig
    features: int  # planes
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        cfg = self.cfg
        width, c_out = cfg.inner_width(self.features), self.features * cfg.expansion
        identity = x
        if self.stride != 1 or x.shape[-1] != c_out:
            identity = Downsample(cfg, c_out, self.stride, name="downsample")(x, train=train)
        out = _conv(cfg, width, kernel=1, padding=0, name="conv1")(x)
        out = nn.relu(_batch_norm(cfg, train=train, name="bn1")(out))
        out = _conv(cfg, width, kernel=3, stride=self.stride, padding=1, groups=cfg.groups, name="conv2")(out)
        out = nn.relu(_batch_norm(cfg, train=train, name="bn2")(out))
        out = _conv(cfg, c_out, kernel=1, padding=0, name="conv3")(out)
        zero = cfg.zero_init_residual
        return nn.relu(_batch_norm(cfg, train=train, name="bn3", zero_scale=zero)(out) + identity)


class Stage(nn.Module):
    """torch's ``layer{i}`` ``nn.Sequential`` of blocks named ``0``, ``1``, ..."""

    cfg: ResNetConfig
    features: int
    blocks: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        block = Bottleneck if self.cfg.block == "bottleneck" else BasicBlock
        for b in range(self.blocks):
            x = block(self.cfg, self.features, stride=self.stride if b == 0 else 1, name=str(b))(x, train=train)
        return x


class ResNet(nn.Module):
    """torchvision's ResNet (BasicBlock or Bottleneck) with torchvision's layer names."""

    cfg: ResNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """(N, H, W, C) -> (N, num_classes) logits."""
        cfg = self.cfg
        _check(cfg, x, train)
        if cfg.stem == "imagenet":
            x = _conv(cfg, cfg.width, kernel=7, stride=2, padding=3, name="conv1")(x)
        else:
            x = _conv(cfg, cfg.width, kernel=3, padding=1, name="conv1")(x)
        x = nn.relu(_batch_norm(cfg, train=train, name="bn1")(x))
        if cfg.stem == "imagenet":
            # max_pool pads with -inf, as torch's MaxPool2d does
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, (blocks, width) in enumerate(zip(cfg.layers, cfg.stage_widths(), strict=True), start=1):
            x = Stage(cfg, width, blocks, stride=1 if i == 1 else 2, name=f"layer{i}")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))  # global average pool: (N, H, W, C) -> (N, C)
        x = _dropout(cfg.dropout, train=train, name="dropout")(x)
        return _linear(cfg, cfg.num_classes, name="fc")(x)


def build(cfg: ModelConfig) -> nn.Module:
    """The linen module for a configuration."""
    kinds = {MLPConfig: MLP, CNNConfig: CNN, ResNetConfig: ResNet}
    if type(cfg) not in kinds:
        raise TypeError(f"unknown config type {type(cfg).__name__}; expected MLPConfig, CNNConfig or ResNetConfig")
    return kinds[type(cfg)](cfg)
