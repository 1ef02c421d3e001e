"""MLP, CNN and ResNet in ``flax.nnx``: the twins of ``torchbn/models.py``.

Images are NHWC. The mode is nnx's own switch, as in torch: ``model.train()`` /
``model.eval()`` set ``use_running_average`` and ``deterministic`` on every submodule.
State lives in the module: ``nnx.BatchStat`` variables change in place in training
(also under ``nnx.jit``), and each Dropout draws from its own ``dropout`` stream forked
from the ``Rngs`` given at construction, advancing on every call::

    model = MLP(cfg, rngs=nnx.Rngs(params=0, dropout=1))
    model.train(); logits = model(x)    # fresh mask, statistics updated
    model.eval();  logits = model(x)    # running statistics, no dropout

Layer names equal torch's (``fc1``, ``bn1``, ``drop1``, ``layer1/0/bn2``,
``layer2/0/downsample/1``); the helpers and classes are those of ``torchbn/models.py``, in
the same order.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from flaxbn.batchnorm import NnxBatchNorm, NnxOnePassBatchNorm, NnxTorchBatchNorm
from flaxbn.config import CNNConfig, MLPConfig, ModelConfig, ResNetConfig, check_input
from flaxbn.pooling import max_pool_2x2

# --- layers, configured once ------------------------------------------------------------------


def _check(model: nnx.Module, x: jax.Array, bn: nnx.Module | None) -> None:
    """Training is when the first BatchNorm (if any) uses batch statistics."""
    train = bn is not None and not bn.use_running_average
    check_input(model.cfg, tuple(x.shape), jnp.issubdtype(x.dtype, jnp.floating), train)


def _dtype(cfg: ModelConfig) -> jnp.dtype | None:
    """Compute dtype of matmuls and convolutions (parameters stay float32): bfloat16, or
    None for "float32", which lets Flax follow the inputs and parameters (float64 too)."""
    return jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else None


def _batch_norm(cfg: ModelConfig, features: int, *, rngs: nnx.Rngs) -> nnx.Module:
    """Normalises the last axis (features or channels, NHWC); statistics stay float32."""
    if cfg.bn_semantics == "torch":
        return NnxTorchBatchNorm(
            features, momentum=cfg.bn_momentum, epsilon=cfg.bn_eps, variance=cfg.bn_variance, rngs=rngs
        )
    if cfg.bn_variance == "shifted":
        return NnxOnePassBatchNorm(
            features,
            momentum=cfg.bn_momentum,
            epsilon=cfg.bn_eps,
            axis_name=cfg.bn_axis_name,
            dtype=_dtype(cfg),
            rngs=rngs,
        )
    return NnxBatchNorm(
        features,
        momentum=cfg.bn_momentum,
        epsilon=cfg.bn_eps,
        use_fast_variance=False,  # two-pass variance, as torch computes it
        axis_name=cfg.bn_axis_name,  # None: per-device statistics
        dtype=_dtype(cfg),  # statistics stay float32
        rngs=rngs,
    )


def _conv(
    cfg: ModelConfig,
    c_in: int,
    c_out: int,
    *,
    kernel: int,
    stride: int = 1,
    padding: int,
    groups: int = 1,
    bias: bool = False,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    pad = ((padding, padding), (padding, padding))  # torch's symmetric padding, never 'SAME'
    return nnx.Conv(
        c_in,
        c_out,
        (kernel, kernel),
        strides=(stride, stride),
        padding=pad,
        feature_group_count=groups,  # torch's groups
        use_bias=bias,
        dtype=_dtype(cfg),
        rngs=rngs,
    )


def _linear(cfg: ModelConfig, n_in: int, n_out: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, dtype=_dtype(cfg), rngs=rngs)


def _dropout(rate: float, *, channelwise: bool = False, rngs: nnx.Rngs) -> nnx.Dropout:
    """Element-wise, or channel-wise (broadcast over H and W: one mask value per (sample,
    channel), like torch's Dropout2d). Draws from the ``dropout`` stream of ``rngs``."""
    return nnx.Dropout(rate, broadcast_dims=(1, 2) if channelwise else (), rngs=rngs)


def _downsample(cfg: ModelConfig, c_in: int, c_out: int, *, stride: int, rngs: nnx.Rngs) -> nnx.List | None:
    """A residual block's shortcut, torch's ``nn.Sequential(conv1x1, bn)`` (entries 0 and 1),
    or None when the block keeps its shape."""
    if stride == 1 and c_in == c_out:
        return None
    return nnx.List(
        [_conv(cfg, c_in, c_out, kernel=1, stride=stride, padding=0, rngs=rngs), _batch_norm(cfg, c_out, rngs=rngs)]
    )


# --- models -----------------------------------------------------------------------------------


class MLP(nnx.Module):
    """``fc{i} -> bn{i} -> relu -> drop{i}`` for each hidden width, then ``head``."""

    def __init__(self, cfg: MLPConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        widths = (cfg.in_features, *cfg.hidden)
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths), start=1):
            setattr(self, f"fc{i}", _linear(cfg, n_in, n_out, rngs=rngs))
            if cfg.use_bn:
                setattr(self, f"bn{i}", _batch_norm(cfg, n_out, rngs=rngs))
            setattr(self, f"drop{i}", _dropout(cfg.dropout, rngs=rngs))
        self.head = _linear(cfg, widths[-1], cfg.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, in_features) -> (N, num_classes) logits."""
        _check(self, x, getattr(self, "bn1", None))
        for i in range(1, len(self.cfg.hidden) + 1):
            x = getattr(self, f"fc{i}")(x)
            if self.cfg.use_bn:
                x = getattr(self, f"bn{i}")(x)
            x = getattr(self, f"drop{i}")(nnx.relu(x))
        return self.head(x)


class CNN(nnx.Module):
    """``conv{i} -> bn{i} -> relu -> max_pool 2 -> drop{i}`` (channel-wise), then
    ``flatten -> fc -> fc_bn -> relu -> drop -> head``."""

    def __init__(self, cfg: CNNConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        chans = (cfg.in_channels, *cfg.channels)
        for i, (c_in, c_out) in enumerate(itertools.pairwise(chans), start=1):
            setattr(self, f"conv{i}", _conv(cfg, c_in, c_out, kernel=3, padding=1, bias=not cfg.use_bn, rngs=rngs))
            if cfg.use_bn:
                setattr(self, f"bn{i}", _batch_norm(cfg, c_out, rngs=rngs))
            setattr(self, f"drop{i}", _dropout(cfg.dropout2d, channelwise=True, rngs=rngs))
        c, h, w = cfg.flatten_shape
        self.fc = _linear(cfg, h * w * c, cfg.hidden, rngs=rngs)
        if cfg.use_bn:
            self.fc_bn = _batch_norm(cfg, cfg.hidden, rngs=rngs)
        self.drop = _dropout(cfg.dropout, rngs=rngs)
        self.head = _linear(cfg, cfg.hidden, cfg.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C) -> (N, num_classes) logits."""
        _check(self, x, getattr(self, "bn1", None))
        for i in range(1, len(self.cfg.channels) + 1):
            x = getattr(self, f"conv{i}")(x)
            if self.cfg.use_bn:
                x = getattr(self, f"bn{i}")(x)
            x = max_pool_2x2(nnx.relu(x))  # torch's MaxPool2d(2), fast on XLA:CPU (flaxbn/pooling.py)
            x = getattr(self, f"drop{i}")(x)
        x = x.reshape(x.shape[0], -1)  # (N, H, W, C) -> (N, H*W*C), channel-minor
        x = self.fc(x)
        if self.cfg.use_bn:
            x = self.fc_bn(x)
        return self.head(self.drop(nnx.relu(x)))


class BasicBlock(nnx.Module):
    """torchvision's BasicBlock: two 3x3 convs, identity or 1x1 ``downsample`` shortcut."""

    def __init__(self, cfg: ResNetConfig, c_in: int, c_out: int, *, stride: int, rngs: nnx.Rngs):
        self.conv1 = _conv(cfg, c_in, c_out, kernel=3, stride=stride, padding=1, rngs=rngs)
        self.bn1 = _batch_norm(cfg, c_out, rngs=rngs)
        self.conv2 = _conv(cfg, c_out, c_out, kernel=3, padding=1, rngs=rngs)
        self.bn2 = _batch_norm(cfg, c_out, rngs=rngs)
        self.downsample = _downsample(cfg, c_in, c_out, stride=stride, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        out = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nnx.Module):
    """torchvision's Bottleneck ("ResNet v1.5"): 1x1, grouped 3x3 with the stride, 1x1 up to
    ``planes * 4``, identity or 1x1 ``downsample`` shortcut."""

    def __init__(self, cfg: ResNetConfig, c_in: int, planes: int, *, stride: int, rngs: nnx.Rngs):
        width, c_out = cfg.inner_width(planes), planes * cfg.expansion
        self.conv1 = _conv(cfg, c_in, width, kernel=1, padding=0, rngs=rngs)
        self.bn1 = _batch_norm(cfg, width, rngs=rngs)
        self.conv2 = _conv(cfg, width, width, kernel=3, stride=stride, padding=1, groups=cfg.groups, rngs=rngs)
        self.bn2 = _batch_norm(cfg, width, rngs=rngs)
        self.conv3 = _conv(cfg, width, c_out, kernel=1, padding=0, rngs=rngs)
        self.bn3 = _batch_norm(cfg, c_out, rngs=rngs)
        self.downsample = _downsample(cfg, c_in, c_out, stride=stride, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else self.downsample[1](self.downsample[0](x))
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = nnx.relu(self.bn2(self.conv2(out)))
        return nnx.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nnx.Module):
    """torchvision's ResNet (BasicBlock or Bottleneck) with torchvision's layer names."""

    def __init__(self, cfg: ResNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if cfg.stem == "imagenet":
            self.conv1 = _conv(cfg, cfg.in_channels, cfg.width, kernel=7, stride=2, padding=3, rngs=rngs)
        else:
            self.conv1 = _conv(cfg, cfg.in_channels, cfg.width, kernel=3, padding=1, rngs=rngs)
        self.bn1 = _batch_norm(cfg, cfg.width, rngs=rngs)
        block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        c_in = cfg.width
        for i, (blocks, planes) in enumerate(zip(cfg.layers, cfg.stage_widths(), strict=True), start=1):
            stride = 1 if i == 1 else 2
            stage = [
                block(
                    cfg, c_in if b == 0 else planes * cfg.expansion, planes, stride=stride if b == 0 else 1, rngs=rngs
                )
                for b in range(blocks)
            ]
            setattr(self, f"layer{i}", nnx.List(stage))
            c_in = planes * cfg.expansion
        self.dropout = _dropout(cfg.dropout, rngs=rngs)
        self.fc = _linear(cfg, c_in, cfg.num_classes, rngs=rngs)
        if cfg.zero_init_residual:  # as torchvision: every block starts as the identity
            for i in range(1, len(cfg.layers) + 1):
                for block in getattr(self, f"layer{i}"):
                    last = block.bn3 if cfg.block == "bottleneck" else block.bn2
                    last.scale.value = jnp.zeros_like(last.scale.value)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C) -> (N, num_classes) logits."""
        _check(self, x, self.bn1)
        x = nnx.relu(self.bn1(self.conv1(x)))
        if self.cfg.stem == "imagenet":
            # max_pool pads with -inf, as torch's MaxPool2d does
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i in range(1, len(self.cfg.layers) + 1):
            for block in getattr(self, f"layer{i}"):
                x = block(x)
        x = jnp.mean(x, axis=(1, 2))  # global average pool: (N, H, W, C) -> (N, C)
        return self.fc(self.dropout(x))


def build(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The nnx module for a configuration (in train mode, nnx's default)."""
    kinds = {MLPConfig: MLP, CNNConfig: CNN, ResNetConfig: ResNet}
    if type(cfg) not in kinds:
        raise TypeError(f"unknown config type {type(cfg).__name__}; expected MLPConfig, CNNConfig or ResNetConfig")
    return kinds[type(cfg)](cfg, rngs=rngs)
