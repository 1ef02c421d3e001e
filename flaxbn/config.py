"""Model configurations for the Flax side (linen and nnx), in Flax's conventions.

Momentum follows Flax: ``running = momentum * running + (1 - momentum) * batch``, so
0.9 here is torch's 0.1. (Flax's own BatchNorm default is 0.99; these configs default to
0.9 so that they match torch's default network.) Images are NHWC. The PyTorch twin
(``torchbn/config.py``) has the same fields; ``compare.conventions`` converts.

``bn_semantics`` picks the BatchNorm (``flaxbn/batchnorm.py``): ``"flax"`` (default) is
stock Flax statistics (biased running variance); ``"torch"`` reproduces torch's
(unbiased running variance, and ``bn_momentum=None`` for the cumulative average).
``bn_axis_name`` is for data parallelism: None keeps per-device batch statistics (each
device normalises with its own shard's), a mesh axis name (inside ``shard_map``)
synchronises them over that axis, which equals BatchNorm over the global batch.
``bn_variance`` is how the batch variance is computed: ``"two_pass"`` (exact, as torch) or
``"shifted"`` (one pass over the activations, as accurate; ``flaxbn/batchnorm.py``).
``compute_dtype="bfloat16"`` is mixed precision: bfloat16 matmuls and convolutions,
float32 parameters and float32 BatchNorm statistics (torch's autocast, in Flax terms).
"""

from __future__ import annotations

import dataclasses
from typing import Literal


def _check(problems: list[str], name: str) -> None:
    if problems:
        raise ValueError(f"invalid {name}: " + "; ".join(problems))


def _common_problems(cfg) -> list[str]:
    problems = []
    if not (isinstance(cfg.num_classes, int) and cfg.num_classes >= 1):
        problems.append(f"num_classes must be an int >= 1, got {cfg.num_classes!r}")
    for field in ("dropout", "dropout2d"):
        p = getattr(cfg, field, 0.0)
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            problems.append(f"{field} must be in [0, 1], got {p!r}")
    axis = getattr(cfg, "bn_axis_name", None)
    if axis is not None and (not isinstance(axis, str) or cfg.bn_semantics != "flax"):
        problems.append(f"bn_axis_name must be a mesh axis name (str) with bn_semantics='flax', got {axis!r}")
    if cfg.compute_dtype not in ("float32", "bfloat16"):
        problems.append(f"compute_dtype must be 'float32' or 'bfloat16', got {cfg.compute_dtype!r}")
    if cfg.bn_variance not in ("two_pass", "shifted"):
        problems.append(f"bn_variance must be 'two_pass' or 'shifted', got {cfg.bn_variance!r}")
    if cfg.bn_semantics not in ("flax", "torch"):
        problems.append(f"bn_semantics must be 'flax' or 'torch', got {cfg.bn_semantics!r}")
    m = cfg.bn_momentum
    if m is None and cfg.bn_semantics != "torch":
        problems.append("bn_momentum=None (cumulative average) needs bn_semantics='torch'")
    elif m is not None and not (isinstance(m, (int, float)) and 0.0 <= m <= 1.0):
        problems.append(f"bn_momentum must be in [0, 1] (Flax direction: weight of the old value), got {m!r}")
    if not (isinstance(cfg.bn_eps, (int, float)) and cfg.bn_eps > 0):
        problems.append(f"bn_eps must be > 0, got {cfg.bn_eps!r}")
    return problems


def _positive_ints(values, field: str) -> list[str]:
    if not isinstance(values, tuple) or not values:
        return [f"{field} must be a non-empty tuple of ints >= 1, got {values!r}"]
    bad = [v for v in values if not (isinstance(v, int) and v >= 1)]
    return [f"{field} must hold ints >= 1, got {values!r}"] if bad else []


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonConfig:
    """The settings every model shares, in Flax's conventions (momentum: the weight of
    the old value), with the BatchNorm semantics, compute dtype and data-parallel axis
    described above. Keyword-only."""

    bn_momentum: float | None = 0.9
    bn_eps: float = 1e-5
    bn_semantics: Literal["flax", "torch"] = "flax"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    bn_axis_name: str | None = None
    bn_variance: Literal["two_pass", "shifted"] = "two_pass"


@dataclasses.dataclass(frozen=True)
class MLPConfig(CommonConfig):
    """``(Dense -> BatchNorm -> ReLU -> Dropout) * len(hidden) -> Dense``."""

    in_features: int = 64
    hidden: tuple[int, ...] = (256, 256)
    num_classes: int = 10
    dropout: float = 0.5
    use_bn: bool = True

    def __post_init__(self):
        problems = _common_problems(self) + _positive_ints(self.hidden, "hidden")
        if not (isinstance(self.in_features, int) and self.in_features >= 1):
            problems.append(f"in_features must be an int >= 1, got {self.in_features!r}")
        _check(problems, type(self).__name__)


@dataclasses.dataclass(frozen=True)
class CNNConfig(CommonConfig):
    """``(Conv3x3 -> BatchNorm -> ReLU -> MaxPool2 -> channel Dropout) * len(channels)``,
    then ``flatten -> Dense -> BatchNorm -> ReLU -> Dropout -> Dense``.

    ``image_size`` must be divisible by ``2 ** len(channels)`` (one 2x2 pool per block).
    """

    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (32, 64)
    hidden: int = 128
    num_classes: int = 10
    dropout2d: float = 0.1
    dropout: float = 0.5
    use_bn: bool = True

    def __post_init__(self):
        problems = _common_problems(self) + _positive_ints(self.channels, "channels")
        for field in ("in_channels", "image_size", "hidden"):
            v = getattr(self, field)
            if not (isinstance(v, int) and v >= 1):
                problems.append(f"{field} must be an int >= 1, got {v!r}")
        if not problems and self.image_size % 2 ** len(self.channels):
            problems.append(
                f"image_size must be divisible by 2**len(channels) = {2 ** len(self.channels)}, got {self.image_size}"
            )
        _check(problems, type(self).__name__)

    @property
    def flatten_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the feature map that is flattened before ``fc``."""
        side = self.image_size // 2 ** len(self.channels)
        return (side, side, self.channels[-1])


@dataclasses.dataclass(frozen=True)
class ResNetConfig(CommonConfig):
    """torchvision's ResNet: BasicBlocks (resnet18: ``layers=(2, 2, 2, 2)``) or Bottlenecks
    (``block="bottleneck"``; resnet50: ``layers=(3, 4, 6, 3)``; wide and ResNeXt variants by
    ``width_per_group`` and ``groups``), "ResNet v1.5": the stride on the 3x3 convolution.

    ``stem="imagenet"`` is torchvision's 7x7/2 conv + 3x3/2 max-pool; ``stem="cifar"``
    is a 3x3/1 conv and no pool, for 32x32 inputs. Layer names are torchvision's.
    ``dropout`` is applied before ``fc`` (0 keeps the torchvision network unchanged).
    """

    layers: tuple[int, ...] = (2, 2, 2, 2)
    num_classes: int = 1000
    in_channels: int = 3
    width: int = 64
    stem: Literal["imagenet", "cifar"] = "imagenet"
    dropout: float = 0.0
    zero_init_residual: bool = False
    block: Literal["basic", "bottleneck"] = "basic"
    groups: int = 1  # bottleneck only: grouped 3x3 convolutions (ResNeXt)
    width_per_group: int = 64  # bottleneck only: 128 for the wide ResNets, 4 or 8 for ResNeXt

    def __post_init__(self):
        problems = _common_problems(self) + _positive_ints(self.layers, "layers")
        for field in ("in_channels", "width"):
            v = getattr(self, field)
            if not (isinstance(v, int) and v >= 1):
                problems.append(f"{field} must be an int >= 1, got {v!r}")
        if self.stem not in ("imagenet", "cifar"):
            problems.append(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if self.block not in ("basic", "bottleneck"):
            problems.append(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        for field in ("groups", "width_per_group"):
            v = getattr(self, field)
            if not (isinstance(v, int) and v >= 1):
                problems.append(f"{field} must be an int >= 1, got {v!r}")
        if self.block == "basic" and (self.groups, self.width_per_group) != (1, 64):
            problems.append("groups and width_per_group apply to bottleneck blocks only (torchvision's rule)")
        _check(problems, type(self).__name__)

    expansion = property(lambda self: 4 if self.block == "bottleneck" else 1)

    def stage_widths(self) -> tuple[int, ...]:
        """Each stage's "planes"; its blocks output ``planes * expansion`` channels."""
        return tuple(self.width * 2**i for i in range(len(self.layers)))

    @property
    def min_image_size(self) -> int:
        """The smallest side an input image may have: each stride-2 step halves it, and the
        last stage must still see at least one pixel (32 for the imagenet stem and four
        stages, 8 for the cifar stem)."""
        return 2 ** (len(self.layers) - 1 + (2 if self.stem == "imagenet" else 0))

    def inner_width(self, planes: int) -> int:
        """A bottleneck's 3x3 width, torchvision's ``int(planes * width_per_group / 64) * groups``."""
        return int(planes * (self.width_per_group / 64.0)) * self.groups


ModelConfig = MLPConfig | CNNConfig | ResNetConfig


def input_problems(cfg, shape: tuple[int, ...], is_float: bool, train: bool, layout: str = "NHWC") -> list[str]:
    """Everything wrong with a model input of ``shape`` for ``cfg`` (empty when it fits).

    Images are ``layout`` ("NCHW" for torch, "NHWC" for Flax); a training batch needs two
    samples for BatchNorm's batch statistics.
    """
    problems = []
    if not is_float:
        problems.append("dtype: expected a floating-point input")
    if isinstance(cfg, MLPConfig):
        if len(shape) != 2 or shape[1] != cfg.in_features:
            problems.append(f"shape {tuple(shape)}: expected (N, {cfg.in_features})")
    else:
        c_axis = 1 if layout == "NCHW" else 3
        want = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
        if len(shape) != 4:
            problems.append(f"shape {tuple(shape)}: expected rank 4, {want}")
        else:
            h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
            if shape[c_axis] != cfg.in_channels:
                problems.append(f"shape {tuple(shape)}: expected {cfg.in_channels} channels on axis {c_axis} ({want})")
            if isinstance(cfg, CNNConfig) and (h, w) != (cfg.image_size, cfg.image_size):
                problems.append(f"shape {tuple(shape)}: expected {cfg.image_size}x{cfg.image_size} images, got {h}x{w}")
            if isinstance(cfg, ResNetConfig):
                smallest = cfg.min_image_size
                if min(h, w) < smallest:
                    problems.append(
                        f"shape {tuple(shape)}: images must be at least {smallest}x{smallest} for this ResNet"
                    )
    if shape and shape[0] == 0:
        problems.append("empty batch: expected N >= 1")
    elif shape and shape[0] == 1 and train and getattr(cfg, "use_bn", True):
        problems.append("a batch of one in training: BatchNorm needs N >= 2 to compute batch statistics")
    return problems


def check_input(cfg, shape: tuple[int, ...], is_float: bool, train: bool, layout: str = "NHWC") -> None:
    """Raises one ValueError listing every problem of :func:`input_problems`."""
    problems = input_problems(cfg, shape, is_float, train, layout)
    if problems:
        raise ValueError(f"invalid input for {type(cfg).__name__}: " + "; ".join(problems))
