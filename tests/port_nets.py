"""Small torch networks with the structure of the torchvision families (torchvision is not
a test dependency): the same modules, functions and forward code, at small widths.

Each builder takes nothing and returns ``(model, input_shape)``; ``FAMILIES`` names them.
The code follows torchvision's (``torchvision/models/*.py``, ``torchvision/ops``) so that a
construct it uses is a construct tested here: ``Conv2dNormActivation`` as a Sequential,
``SqueezeExcitation``'s ``scale * input``, ``stochastic_depth`` as an ``fx.wrap``'ed call,
``channel_shuffle``'s ``size()`` arithmetic, DenseNet's ``torch.cat`` of a list,
ConvNeXt's ``Permute`` + ``LayerNorm`` + layer scale, in-place activations and ``+=``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from compare import registry

# --- torchvision.ops ---------------------------------------------------------------------------


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """torchvision.ops.stochastic_depth."""
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, input):
        return stochastic_depth(input, self.p, self.mode, self.training)


class ConvNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: conv (no bias), BatchNorm, activation."""

    def __init__(self, c_in, c_out, kernel=3, stride=1, groups=1, activation: Callable | None = nn.ReLU):
        layers = [
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        if activation is not None:
            layers.append(activation(inplace=True) if activation is not nn.Sigmoid else activation())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation."""

    def __init__(self, channels, squeeze, activation=nn.ReLU, scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = activation(), scale_activation()

    def forward(self, input):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(input)))))
        return scale * input


# --- the families ---------------------------------------------------------------------------------


class VGG(nn.Module):
    def __init__(self):
        super().__init__()
        cfg, layers, c = [8, "M", 16, "M"], [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))  # 4x4 -> 3x3: windows of 2 overlapping by 1
        self.classifier = nn.Sequential(
            nn.Linear(16 * 3 * 3, 32),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(32, 32),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(32, 10),
        )

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1, depthwise 3x3, project 1x1, ReLU6, residual."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        layers = [ConvNormActivation(inp, hidden, 1, activation=nn.ReLU6)] if expand_ratio != 1 else []
        layers += [
            ConvNormActivation(hidden, hidden, stride=stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormActivation(3, 8, stride=2, activation=nn.ReLU6),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 6),
            InvertedResidual(12, 12, 1, 6),
            ConvNormActivation(12, 32, 1, activation=nn.ReLU6),
        )
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(32, 10))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class InvertedResidualV3(nn.Module):
    """MobileNetV3's block: Hardswish or ReLU, squeeze-excitation with Hardsigmoid."""

    def __init__(self, c_in, expanded, c_out, kernel, stride, se, activation):
        super().__init__()
        self.use_res_connect = stride == 1 and c_in == c_out
        layers = [ConvNormActivation(c_in, expanded, 1, activation=activation)] if expanded != c_in else []
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded, activation=activation))
        if se:
            layers.append(SqueezeExcitation(expanded, max(expanded // 4, 8), scale_activation=nn.Hardsigmoid))
        layers.append(ConvNormActivation(expanded, c_out, 1, activation=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormActivation(3, 8, stride=2, activation=nn.Hardswish),
            InvertedResidualV3(8, 8, 8, 3, 2, True, nn.ReLU),
            InvertedResidualV3(8, 24, 12, 5, 1, True, nn.Hardswish),
            InvertedResidualV3(12, 24, 12, 5, 1, False, nn.Hardswish),
            ConvNormActivation(12, 24, 1, activation=nn.Hardswish),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(24, 32), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True), nn.Linear(32, 10)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MBConv(nn.Module):
    """EfficientNet's block: SiLU, squeeze-excitation with SiLU/Sigmoid, stochastic depth."""

    def __init__(self, c_in, expand, c_out, kernel, stride, sd_prob):
        super().__init__()
        self.use_res_connect = stride == 1 and c_in == c_out
        expanded = c_in * expand
        layers = [ConvNormActivation(c_in, expanded, 1, activation=nn.SiLU)] if expanded != c_in else []
        layers += [
            ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded, activation=nn.SiLU),
            SqueezeExcitation(expanded, max(1, c_in // 4), activation=nn.SiLU),
            ConvNormActivation(expanded, c_out, 1, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class EfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            ConvNormActivation(3, 8, stride=2, activation=nn.SiLU),
            nn.Sequential(MBConv(8, 1, 8, 3, 1, 0.1)),
            nn.Sequential(MBConv(8, 4, 12, 5, 2, 0.15), MBConv(12, 4, 12, 5, 1, 0.2)),
            ConvNormActivation(12, 32, 1, activation=nn.SiLU),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class MNASNet(nn.Module):
    """MNASNet: inverted residuals with ReLU and BatchNorm momentum 1 - 0.9997, ``x.mean([2, 3])``."""

    def __init__(self):
        super().__init__()
        m = 1 - 0.9997

        def block(c_in, c_out, kernel, stride, expand):
            mid = c_in * expand
            return nn.Sequential(
                nn.Conv2d(c_in, mid, 1, bias=False),
                nn.BatchNorm2d(mid, momentum=m),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, mid, kernel, padding=kernel // 2, stride=stride, groups=mid, bias=False),
                nn.BatchNorm2d(mid, momentum=m),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out, momentum=m),
            )

        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(8, momentum=m),
            nn.ReLU(inplace=True),
            block(8, 12, 3, 2, 3),
            block(12, 16, 5, 1, 3),
            nn.Conv2d(16, 32, 1, bias=False),
            nn.BatchNorm2d(32, momentum=m),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.Dropout(p=0.2, inplace=True), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.layers(x).mean([2, 3]))


class ResBottleneckBlock(nn.Module):
    """RegNet's block: 1x1, grouped 3x3 (group width 4), squeeze-excitation, 1x1; projection shortcut."""

    def __init__(self, w_in, w_out, stride, group_width=4, se=True):
        super().__init__()
        self.proj = None
        if w_in != w_out or stride != 1:
            self.proj = ConvNormActivation(w_in, w_out, 1, stride, activation=None)
        layers = OrderedDict(
            a=ConvNormActivation(w_in, w_out, 1),
            b=ConvNormActivation(w_out, w_out, 3, stride, groups=w_out // group_width),
        )
        if se:
            layers["se"] = SqueezeExcitation(w_out, max(w_in // 4, 1))
        layers["c"] = ConvNormActivation(w_out, w_out, 1, activation=None)
        self.f = nn.Sequential(layers)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.proj(x) + self.f(x) if self.proj is not None else x + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvNormActivation(3, 8, stride=2)
        self.trunk_output = nn.Sequential(
            OrderedDict(block1=nn.Sequential(ResBottleneckBlock(8, 16, 2), ResBottleneckBlock(16, 16, 1, se=False)))
        )
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision.models.shufflenetv2.channel_shuffle."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    def __init__(self, inp, oup, stride):
        super().__init__()
        self.stride, branch = stride, oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
                nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch, 1, bias=False),
                nn.BatchNorm2d(branch),
                nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        c = inp if stride > 1 else branch
        self.branch2 = nn.Sequential(
            nn.Conv2d(c, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False),
            nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, bias=False),
            nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2), ShuffleUnit(16, 16, 1))
        self.conv5 = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.conv5(self.stage2(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))


class DenseLayer(nn.Module):
    def __init__(self, c_in, growth, bn_size, drop_rate):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, input):
        prev_features = [input] if isinstance(input, torch.Tensor) else input
        bottleneck = self.conv1(self.relu1(self.norm1(torch.cat(prev_features, 1))))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    def __init__(self, layers, c_in, growth, bn_size=2, drop_rate=0.1):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(c_in + i * growth, growth, bn_size, drop_rate))

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv0=nn.Conv2d(3, 8, 7, 2, 3, bias=False),
                norm0=nn.BatchNorm2d(8),
                relu0=nn.ReLU(inplace=True),
                pool0=nn.MaxPool2d(3, 2, 1),
                denseblock1=DenseBlock(2, 8, 4),
                transition1=nn.Sequential(
                    OrderedDict(
                        norm=nn.BatchNorm2d(16),
                        relu=nn.ReLU(inplace=True),
                        conv=nn.Conv2d(16, 8, 1, bias=False),
                        pool=nn.AvgPool2d(kernel_size=2, stride=2),
                    )
                ),
                denseblock2=DenseBlock(2, 8, 4),
                norm5=nn.BatchNorm2d(16),
            )
        )
        self.classifier = nn.Linear(16, 10)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's: a LayerNorm over channels of an NCHW map, through two permutes."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    def __init__(self, dim, sd_prob):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) + 0.5)
        self.stochastic_depth = StochasticDepth(sd_prob, "row")

    def forward(self, input):
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class ConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, kernel_size=4, stride=4), LayerNorm2d(8, eps=1e-6)),
            nn.Sequential(CNBlock(8, 0.1), CNBlock(8, 0.2)),
            nn.Sequential(LayerNorm2d(8, eps=1e-6), nn.Conv2d(8, 16, kernel_size=2, stride=2)),
            nn.Sequential(CNBlock(16, 0.3)),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(16, eps=1e-6), nn.Flatten(1), nn.Linear(16, 10))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


class Net1d(nn.Module):
    """A 1-D conv net: Conv1d ('same' with dilation, groups), BatchNorm1d, pools, Dropout1d."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv1d(4, 8, 5, padding=2), nn.BatchNorm1d(8)
        self.pool = nn.MaxPool1d(2, ceil_mode=True)
        self.conv2 = nn.Conv1d(8, 16, 3, padding="same", dilation=2, groups=2, bias=False)
        self.bn2, self.drop = nn.BatchNorm1d(16), nn.Dropout1d(0.2)
        self.avg = nn.AvgPool1d(3, stride=2, padding=1, count_include_pad=False)
        self.head = nn.Linear(16 * 4, 5)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.avg(self.drop(F.gelu(self.bn2(self.conv2(x)))))
        return self.head(x.flatten(1))  # (C, L) flattened: the Linear's weight is permuted


def _resnet(name: str, **fields) -> nn.Module:
    return registry.get(name).replace(width=8, **fields).build_torch()


FAMILIES: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "vgg_bn": lambda: (VGG(), (3, 16, 16)),
    "resnet_basic": lambda: (_resnet("resnet18", layers=(1, 1, 1, 1), num_classes=10), (3, 32, 32)),
    "resnet_bottleneck": lambda: (
        _resnet("resnext50_32x4d", layers=(1, 1, 1, 1), num_classes=10, groups=4, width_per_group=16),
        (3, 32, 32),
    ),
    "mobilenet_v2": lambda: (MobileNetV2(), (3, 16, 16)),
    "mobilenet_v3": lambda: (MobileNetV3(), (3, 16, 16)),
    "efficientnet": lambda: (EfficientNet(), (3, 16, 16)),
    "mnasnet": lambda: (MNASNet(), (3, 16, 16)),
    "regnet": lambda: (RegNet(), (3, 16, 16)),
    "shufflenet_v2": lambda: (ShuffleNetV2(), (3, 16, 16)),
    "densenet": lambda: (DenseNet(), (3, 32, 32)),
    "convnext": lambda: (ConvNeXt(), (3, 32, 32)),
    "conv1d": lambda: (Net1d(), (4, 16)),
}


class WithUpsample(nn.Module):
    """Not portable: an Upsample module and a tensor slice."""

    def __init__(self):
        super().__init__()
        self.conv, self.up = nn.Conv2d(3, 4, 3, padding=1), nn.Upsample(scale_factor=2)

    def forward(self, x):
        return self.up(self.conv(x))[:, :2]
