"""MLP, CNN and ResNet in PyTorch: the reference side of every comparison.

Inputs are NCHW (images) or (N, features). The mode is torch's own switch,
``model.train()`` / ``model.eval()``: in training BatchNorm normalises with the batch
mean and *biased* batch variance and updates its buffers in place (running_var with the
*unbiased* variance); Dropout draws its masks from torch's global generator
(``torch.manual_seed``) and is the identity in eval. Layer names
(``fc1``, ``bn1``, ``drop1``, ``layer1.0.bn2``, ...) are the same in ``flaxbn``, whose
``linen_models.py`` and ``nnx_models.py`` mirror this file: the same helpers in the same
order, the same classes, ``use_bn=False`` leaving the BatchNorm layers out.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from torchbn.config import CNNConfig, MLPConfig, ModelConfig, ResNetConfig, check_input

# --- layers, configured once ------------------------------------------------------------------


def _check(model: nn.Module, x: torch.Tensor) -> None:
    if isinstance(x, torch.fx.Proxy):  # traced by torch.fx (compare.port): the check runs on real inputs only
        return
    check_input(model.cfg, tuple(x.shape), x.is_floating_point(), model.training)


def _batch_norm(cfg: ModelConfig, features: int, *, images: bool) -> nn.Module:
    """BatchNorm2d over (N, C, H, W) when ``images``, else BatchNorm1d over (N, C)."""
    kind = nn.BatchNorm2d if images else nn.BatchNorm1d
    return kind(features, eps=cfg.bn_eps, momentum=cfg.bn_momentum)


def _conv(
    c_in: int, c_out: int, *, kernel: int, stride: int = 1, padding: int, groups: int = 1, bias: bool = False
) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, groups=groups, bias=bias)


def _linear(n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out)


def _dropout(rate: float, *, channelwise: bool = False) -> nn.Module:
    """Element-wise Dropout, or Dropout2d: one Bernoulli draw per (sample, channel)."""
    return nn.Dropout2d(rate) if channelwise else nn.Dropout(rate)


def _downsample(cfg: ResNetConfig, c_in: int, c_out: int, *, stride: int) -> nn.Sequential | None:
    """A residual block's shortcut, ``nn.Sequential(conv1x1, bn)`` (torchvision's keys
    ``downsample.0``, ``downsample.1``), or None when the block keeps its shape."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_conv(c_in, c_out, kernel=1, stride=stride, padding=0), _batch_norm(cfg, c_out, images=True))


# --- models -----------------------------------------------------------------------------------


class MLP(nn.Module):
    """``fc{i} -> bn{i} -> relu -> drop{i}`` for each hidden width, then ``head``."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        widths = (cfg.in_features, *cfg.hidden)
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths), start=1):
            setattr(self, f"fc{i}", _linear(n_in, n_out))
            if cfg.use_bn:
                setattr(self, f"bn{i}", _batch_norm(cfg, n_out, images=False))
            setattr(self, f"drop{i}", _dropout(cfg.dropout))
        self.head = _linear(widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_features) -> (N, num_classes) logits."""
        _check(self, x)
        for i in range(1, len(self.cfg.hidden) + 1):
            x = getattr(self, f"fc{i}")(x)
            if self.cfg.use_bn:
                x = getattr(self, f"bn{i}")(x)
            x = getattr(self, f"drop{i}")(torch.relu(x))
        return self.head(x)


class CNN(nn.Module):
    """``conv{i} -> bn{i} -> relu -> maxpool2 -> drop{i}`` (channel-wise), then
    ``flatten -> fc -> fc_bn -> relu -> drop -> head``.

    Convolutions have no bias when followed by BatchNorm (it would be cancelled by the
    mean subtraction); with ``use_bn=False`` they have one.
    """

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        chans = (cfg.in_channels, *cfg.channels)
        for i, (c_in, c_out) in enumerate(itertools.pairwise(chans), start=1):
            setattr(self, f"conv{i}", _conv(c_in, c_out, kernel=3, padding=1, bias=not cfg.use_bn))
            if cfg.use_bn:
                setattr(self, f"bn{i}", _batch_norm(cfg, c_out, images=True))
            setattr(self, f"drop{i}", _dropout(cfg.dropout2d, channelwise=True))
        c, h, w = cfg.flatten_shape
        self.fc = _linear(c * h * w, cfg.hidden)
        if cfg.use_bn:
            self.fc_bn = _batch_norm(cfg, cfg.hidden, images=False)
        self.drop = _dropout(cfg.dropout)
        self.head = _linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        _check(self, x)
        for i in range(1, len(self.cfg.channels) + 1):
            x = getattr(self, f"conv{i}")(x)
            if self.cfg.use_bn:
                x = getattr(self, f"bn{i}")(x)
            x = nn.functional.max_pool2d(torch.relu(x), 2)
            x = getattr(self, f"drop{i}")(x)
        x = torch.flatten(x, 1)  # (N, C, H, W) -> (N, C*H*W), channel-major
        x = self.fc(x)
        if self.cfg.use_bn:
            x = self.fc_bn(x)
        return self.head(self.drop(torch.relu(x)))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs, identity or 1x1 ``downsample`` shortcut."""

    def __init__(self, cfg: ResNetConfig, c_in: int, c_out: int, *, stride: int):
        super().__init__()
        self.conv1 = _conv(c_in, c_out, kernel=3, stride=stride, padding=1)
        self.bn1 = _batch_norm(cfg, c_out, images=True)
        self.conv2 = _conv(c_out, c_out, kernel=3, padding=1)
        self.bn2 = _batch_norm(cfg, c_out, images=True)
        self.downsample = _downsample(cfg, c_in, c_out, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck ("ResNet v1.5": the stride on the 3x3 convolution): 1x1
    down to ``inner_width``, grouped 3x3, 1x1 up to ``planes * 4``, identity or 1x1
    ``downsample`` shortcut."""

    def __init__(self, cfg: ResNetConfig, c_in: int, planes: int, *, stride: int):
        super().__init__()
        width, c_out = cfg.inner_width(planes), planes * cfg.expansion
        self.conv1 = _conv(c_in, width, kernel=1, padding=0)
        self.bn1 = _batch_norm(cfg, width, images=True)
        self.conv2 = _conv(width, width, kernel=3, stride=stride, padding=1, groups=cfg.groups)
        self.bn2 = _batch_norm(cfg, width, images=True)
        self.conv3 = _conv(width, c_out, kernel=1, padding=0)
        self.bn3 = _batch_norm(cfg, c_out, images=True)
        self.downsample = _downsample(cfg, c_in, c_out, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision ResNet (BasicBlock or Bottleneck) with the same state_dict keys, so a
    torchvision ``resnet18`` or ``resnet50`` checkpoint loads with ``strict=True``."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "imagenet":
            self.conv1 = _conv(cfg.in_channels, cfg.width, kernel=7, stride=2, padding=3)
        else:
            self.conv1 = _conv(cfg.in_channels, cfg.width, kernel=3, padding=1)
        self.bn1 = _batch_norm(cfg, cfg.width, images=True)
        block = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        c_in = cfg.width
        for i, (blocks, planes) in enumerate(zip(cfg.layers, cfg.stage_widths(), strict=True), start=1):
            stride = 1 if i == 1 else 2
            stage = [
                block(cfg, c_in if b == 0 else planes * cfg.expansion, planes, stride=stride if b == 0 else 1)
                for b in range(blocks)
            ]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            c_in = planes * cfg.expansion
        self.dropout = _dropout(cfg.dropout)
        self.fc = _linear(c_in, cfg.num_classes)
        self._init_like_torchvision()

    def _init_like_torchvision(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if self.cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        _check(self, x)
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.cfg.stem == "imagenet":
            x = nn.functional.max_pool2d(x, 3, stride=2, padding=1)
        for i in range(1, len(self.cfg.layers) + 1):
            x = getattr(self, f"layer{i}")(x)
        x = torch.flatten(x.mean(dim=(2, 3)), 1)  # global average pool: (N, C, H, W) -> (N, C)
        return self.fc(self.dropout(x))


def build(cfg: ModelConfig) -> nn.Module:
    """The torch model for a configuration."""
    kinds = {MLPConfig: MLP, CNNConfig: CNN, ResNetConfig: ResNet}
    if type(cfg) not in kinds:
        raise TypeError(f"unknown config type {type(cfg).__name__}; expected MLPConfig, CNNConfig or ResNetConfig")
    return kinds[type(cfg)](cfg)
