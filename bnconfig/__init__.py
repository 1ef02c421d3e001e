"""Model configurations shared by both sides: one definition of every architecture's
fields, their validation and the inputs each model takes. Framework-free (the standard
library only), so that ``torchbn`` and ``flaxbn`` both use it without importing each other.

``torchbn.config`` uses these classes as they are: their conventions are torch's, the
reference side (``bn_momentum`` is the weight of the *new* batch, default 0.1; ``None`` is
torch's cumulative average; images NCHW). ``flaxbn.config`` derives a Flax twin of every
kind (:func:`flaxbn.config.twin`): Flax's momentum direction (default 0.9) and the
Flax-only fields. ``compare.conventions`` converts between the two.

Everything a new architecture needs to say about itself is a method of its config, so the
rest of the library derives it instead of dispatching on the kind: the shape of one
sample (:meth:`sample_shape`), which inputs it takes (:meth:`input_problems`), which
Linear reads a flattened feature map (:meth:`flattened_linears`) and the sizes a file may
declare (:meth:`size_problems`). A new kind is one class here, added to :data:`KINDS`,
plus its three model files and a registry entry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

__all__ = ["KINDS", "CNNConfig", "CommonConfig", "MLPConfig", "ModelConfig", "ResNetConfig", "input_problems"]


def _positive_ints(values, field: str) -> list[str]:
    if not isinstance(values, tuple) or not values:
        return [f"{field} must be a non-empty tuple of ints >= 1, got {values!r}"]
    bad = [v for v in values if not (isinstance(v, int) and v >= 1)]
    return [f"{field} must hold ints >= 1, got {values!r}"] if bad else []


def _positive_int_fields(cfg, fields: tuple[str, ...]) -> list[str]:
    return [
        f"{f} must be an int >= 1, got {getattr(cfg, f)!r}"
        for f in fields
        if not (isinstance(getattr(cfg, f), int) and getattr(cfg, f) >= 1)
    ]


@dataclasses.dataclass(frozen=True)
class Caps:
    """The largest sizes a configuration read from a file may declare (the numbers are
    ``compare.io.limits``'s)."""

    width: int
    blocks: int
    stages: int
    hidden_layers: int
    image_side: int
    sample_elements: int
    classes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonConfig:
    """The BatchNorm settings every model shares, in torch's conventions (momentum: the
    weight of the new batch; ``None``: cumulative average). Keyword-only."""

    bn_momentum: float | None = 0.1
    bn_eps: float = 1e-5

    # the fields a file may set to a size, by the cap that bounds them
    SIZE_FIELDS: ClassVar[dict[str, str]] = {"num_classes": "classes"}

    def __post_init__(self):
        problems = self._problems()
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        """Every problem of the configuration; each kind adds its own."""
        problems = _positive_int_fields(self, ("num_classes",))
        for field in ("dropout", "dropout2d"):
            p = getattr(self, field, 0.0)
            if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                problems.append(f"{field} must be in [0, 1], got {p!r}")
        problems += self._momentum_problems()
        if not (isinstance(self.bn_eps, (int, float)) and self.bn_eps > 0):
            problems.append(f"bn_eps must be > 0, got {self.bn_eps!r}")
        return problems

    def _momentum_problems(self) -> list[str]:
        m = self.bn_momentum
        if m is not None and not (isinstance(m, (int, float)) and 0.0 <= m <= 1.0):
            return [f"bn_momentum must be in [0, 1] or None (cumulative average), got {m!r}"]
        return []

    def sample_shape(self, like: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """One sample's shape in torch's layout; ``like`` gives the free sizes (a ResNet's H, W)."""
        raise NotImplementedError

    def input_problems(self, shape: tuple[int, ...], layout: str) -> list[str]:
        """What is wrong with the non-batch part of an input ``shape`` ("NCHW" or "NHWC")."""
        raise NotImplementedError

    def flattened_linears(self) -> dict[str, tuple[int, int, int]]:
        """{Linear layer: (C, H, W)} of the layers that read a flattened feature map."""
        return {}

    @classmethod
    def size_problems(cls, fields: Mapping[str, Any], caps: Caps) -> list[str]:
        """The sizes in raw ``fields`` (read from a file) above ``caps``, before anything is built."""
        problems = []
        for name, cap in cls.SIZE_FIELDS.items():
            if name not in fields:
                continue
            value, high = fields[name], getattr(caps, cap)
            values = value if isinstance(value, (list, tuple)) else [value]
            limit = caps.stages if cap == "blocks" else caps.hidden_layers  # depths per stage, or widths per layer
            if isinstance(value, (list, tuple)) and len(value) > limit:
                problems.append(f"{name} = {value!r}: expected at most {limit} entries")
            elif not all(type(v) is int and 1 <= v <= high for v in values):
                problems.append(f"{name} = {value!r}: expected ints in [1, {high}]")
        return problems


def _images(cfg, shape: tuple[int, ...], layout: str) -> tuple[list[str], tuple[int, int] | None]:
    """The channel check of an image input, and its (H, W)."""
    want = "(N, C, H, W)" if layout == "NCHW" else "(N, H, W, C)"
    if len(shape) != 4:
        return [f"shape {tuple(shape)}: expected rank 4, {want}"], None
    c_axis, (h, w) = (1, shape[2:4]) if layout == "NCHW" else (3, shape[1:3])
    if shape[c_axis] != cfg.in_channels:
        return [f"shape {tuple(shape)}: expected {cfg.in_channels} channels on axis {c_axis} ({want})"], (h, w)
    return [], (h, w)


@dataclasses.dataclass(frozen=True)
class MLPConfig(CommonConfig):
    """``(Linear -> BatchNorm1d -> ReLU -> Dropout) * len(hidden) -> Linear``."""

    in_features: int = 64
    hidden: tuple[int, ...] = (256, 256)
    num_classes: int = 10
    dropout: float = 0.5
    use_bn: bool = True

    SIZE_FIELDS: ClassVar[dict[str, str]] = {
        "num_classes": "classes",
        "in_features": "sample_elements",
        "hidden": "width",
    }

    def _problems(self) -> list[str]:
        return (
            super()._problems() + _positive_ints(self.hidden, "hidden") + _positive_int_fields(self, ("in_features",))
        )

    def sample_shape(self, like=None) -> tuple[int, ...]:
        return (self.in_features,)

    def input_problems(self, shape, layout) -> list[str]:
        return (
            []
            if len(shape) == 2 and shape[1] == self.in_features
            else [f"shape {tuple(shape)}: expected (N, {self.in_features})"]
        )


@dataclasses.dataclass(frozen=True)
class CNNConfig(CommonConfig):
    """``(Conv3x3 -> BatchNorm2d -> ReLU -> MaxPool2 -> Dropout2d) * len(channels)``,
    then ``flatten -> Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear``.

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

    SIZE_FIELDS: ClassVar[dict[str, str]] = {
        "num_classes": "classes",
        "in_channels": "width",
        "image_size": "image_side",
        "channels": "width",
        "hidden": "width",
    }

    def _problems(self) -> list[str]:
        problems = super()._problems() + _positive_ints(self.channels, "channels")
        problems += _positive_int_fields(self, ("in_channels", "image_size", "hidden"))
        if not problems and self.image_size % 2 ** len(self.channels):
            problems.append(
                f"image_size must be divisible by 2**len(channels) = {2 ** len(self.channels)}, got {self.image_size}"
            )
        return problems

    @property
    def flatten_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the feature map that is flattened before ``fc`` (torch's order)."""
        side = self.image_size // 2 ** len(self.channels)
        return (self.channels[-1], side, side)

    def flattened_linears(self) -> dict[str, tuple[int, int, int]]:
        return {"fc": self.flatten_shape}

    def sample_shape(self, like=None) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)

    def input_problems(self, shape, layout) -> list[str]:
        problems, hw = _images(self, shape, layout)
        if hw is not None and tuple(hw) != (self.image_size, self.image_size):
            problems.append(
                f"shape {tuple(shape)}: expected {self.image_size}x{self.image_size} images, got {hw[0]}x{hw[1]}"
            )
        return problems


@dataclasses.dataclass(frozen=True)
class ResNetConfig(CommonConfig):
    """torchvision's ResNet: BasicBlocks (resnet18: ``layers=(2, 2, 2, 2)``) or Bottlenecks
    (``block="bottleneck"``; resnet50: ``layers=(3, 4, 6, 3)``; wide and ResNeXt variants by
    ``width_per_group`` and ``groups``), "ResNet v1.5": the stride on the 3x3 convolution.

    ``stem="imagenet"`` is torchvision's 7x7/2 conv + 3x3/2 max-pool; ``stem="cifar"``
    is a 3x3/1 conv and no pool, for 32x32 inputs. Layer names are torchvision's.
    ``dropout`` is applied before ``fc`` (0 keeps the torchvision network unchanged).
    ``zero_init_residual`` zeroes the scale of each block's last BatchNorm at
    initialisation (every block then starts as the identity), on every side.
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

    SIZE_FIELDS: ClassVar[dict[str, str]] = {
        "num_classes": "classes",
        "in_channels": "width",
        "width": "width",
        "groups": "width",
        "width_per_group": "width",
        "layers": "blocks",
    }

    def _problems(self) -> list[str]:
        problems = super()._problems() + _positive_ints(self.layers, "layers")
        problems += _positive_int_fields(self, ("in_channels", "width", "groups", "width_per_group"))
        if self.stem not in ("imagenet", "cifar"):
            problems.append(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if self.block not in ("basic", "bottleneck"):
            problems.append(f"block must be 'basic' or 'bottleneck', got {self.block!r}")
        if self.block == "basic" and (self.groups, self.width_per_group) != (1, 64):
            problems.append("groups and width_per_group apply to bottleneck blocks only (torchvision's rule)")
        return problems

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

    def sample_shape(self, like=None) -> tuple[int, ...]:
        h, w = like[1:] if like is not None and len(like) == 3 else (224, 224)
        return (self.in_channels, h, w)

    def input_problems(self, shape, layout) -> list[str]:
        problems, hw = _images(self, shape, layout)
        if hw is not None and min(hw) < self.min_image_size:
            side = self.min_image_size
            problems.append(f"shape {tuple(shape)}: images must be at least {side}x{side} for this ResNet")
        return problems

    @classmethod
    def size_problems(cls, fields, caps) -> list[str]:
        problems = super().size_problems(fields, caps)
        layers, width = fields.get("layers"), fields.get("width")
        if type(layers) in (list, tuple) and not layers:
            problems.append(f"layers = {layers!r}: expected 1 to {caps.stages} stages")
        elif type(layers) in (list, tuple) and type(width) is int and width * 2 ** (len(layers) - 1) > caps.width:
            problems.append(f"width {width} doubles past {caps.width} channels over {len(layers)} stages")
        return problems


ModelConfig = MLPConfig | CNNConfig | ResNetConfig
KINDS: dict[str, type[CommonConfig]] = {cls.__name__: cls for cls in (MLPConfig, CNNConfig, ResNetConfig)}


def input_problems(cfg: CommonConfig, shape: tuple[int, ...], is_float: bool, train: bool, layout: str) -> list[str]:
    """Everything wrong with a model input of ``shape`` for ``cfg`` (empty when it fits).

    Images are ``layout`` ("NCHW" for torch, "NHWC" for Flax); a training batch needs two
    samples for BatchNorm's batch statistics.
    """
    problems = [] if is_float else ["dtype: expected a floating-point input"]
    problems += cfg.input_problems(tuple(shape), layout)
    if shape and shape[0] == 0:
        problems.append("empty batch: expected N >= 1")
    elif shape and shape[0] == 1 and train and getattr(cfg, "use_bn", True):
        problems.append("a batch of one in training: BatchNorm needs N >= 2 to compute batch statistics")
    return problems


def check_input(cfg: CommonConfig, shape: tuple[int, ...], is_float: bool, train: bool, layout: str) -> None:
    """Raises one ValueError listing every problem of :func:`input_problems`."""
    problems = input_problems(cfg, shape, is_float, train, layout)
    if problems:
        raise ValueError(f"invalid input for {type(cfg).__name__}: " + "; ".join(problems))
