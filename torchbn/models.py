"""MLP, CNN and ResNet in PyTorch: the reference side of every comparison.

Inputs are NCHW (images) or (N, features). The mode is torch's own switch,
``model.train()`` / ``model.eval()``: in training BatchNorm normalises with the batch
mean and *biased* batch variance and updates its buffers in place (running_var with the
*unbiased* variance); Dropout draws its masks from torch's global generator
(``torch.manual_seed``) and is the identity in eval. Layer names
(``fc1``, ``bn1``, ``layer1.0.bn2``, ...) are the same in ``flaxbn``.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from torchbn.config import CNNConfig, MLPConfig, ModelConfig, ResNetConfig, check_input


def _check(model: nn.Module, x: torch.Tensor) -> None:
    check_input(model.cfg, tuple(x.shape), x.is_floating_point(), model.training)


def _bn(kind: type[nn.modules.batchnorm._BatchNorm], features: int, cfg) -> nn.Module:
    return kind(features, eps=cfg.bn_eps, momentum=cfg.bn_momentum)


class MLP(nn.Module):
    """``fc{i} -> bn{i} -> relu -> drop{i}`` for each hidden width, then ``head``."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        widths = (cfg.in_features, *cfg.hidden)
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths), start=1):
            setattr(self, f"fc{i}", nn.Linear(n_in, n_out))
            setattr(self, f"bn{i}", _bn(nn.BatchNorm1d, n_out, cfg) if cfg.use_bn else nn.Identity())
            setattr(self, f"drop{i}", nn.Dropout(cfg.dropout))
        self.head = nn.Linear(widths[-1], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_features) -> (N, num_classes) logits."""
        _check(self, x)
        for i in range(1, len(self.cfg.hidden) + 1):
            x = getattr(self, f"fc{i}")(x)
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
            conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=not cfg.use_bn)
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", _bn(nn.BatchNorm2d, c_out, cfg) if cfg.use_bn else nn.Identity())
            # Dropout2d zeroes whole channels: one Bernoulli draw per (sample, channel).
            setattr(self, f"drop{i}", nn.Dropout2d(cfg.dropout2d))
        c, h, w = cfg.flatten_shape
        self.fc = nn.Linear(c * h * w, cfg.hidden)
        self.fc_bn = _bn(nn.BatchNorm1d, cfg.hidden, cfg) if cfg.use_bn else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, num_classes) logits."""
        _check(self, x)
        for i in range(1, len(self.cfg.channels) + 1):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            x = getattr(self, f"drop{i}")(nn.functional.max_pool2d(x, 2))
        x = torch.flatten(x, 1)  # (N, C, H, W) -> (N, C*H*W), channel-major
        x = self.drop(torch.relu(self.fc_bn(self.fc(x))))
        return self.head(x)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs, identity or 1x1 ``downsample`` shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, cfg: ResNetConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(nn.BatchNorm2d, c_out, cfg)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = _bn(nn.BatchNorm2d, c_out, cfg)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), _bn(nn.BatchNorm2d, c_out, cfg)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """torchvision ResNet (BasicBlock) with the same state_dict keys, so a torchvision
    ``resnet18`` checkpoint loads with ``strict=True``."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.in_channels, cfg.width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(cfg.in_channels, cfg.width, 3, stride=1, padding=1, bias=False)
        self.bn1 = _bn(nn.BatchNorm2d, cfg.width, cfg)
        c_in = cfg.width
        for i, (blocks, c_out) in enumerate(zip(cfg.layers, cfg.stage_widths(), strict=True), start=1):
            stride = 1 if i == 1 else 2
            stage = [BasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1, cfg) for b in range(blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            c_in = c_out
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(c_in, cfg.num_classes)
        self._init_like_torchvision()

    def _init_like_torchvision(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if self.cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
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
    if isinstance(cfg, MLPConfig):
        return MLP(cfg)
    if isinstance(cfg, CNNConfig):
        return CNN(cfg)
    if isinstance(cfg, ResNetConfig):
        return ResNet(cfg)
    raise TypeError(f"unknown config type {type(cfg).__name__}; expected MLPConfig, CNNConfig or ResNetConfig")
