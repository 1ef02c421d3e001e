"""Every conversion between torch's and Flax's conventions, in one place, by name.

=================  =====================================  ====================================
what               torch                                  Flax
=================  =====================================  ====================================
images             (N, C, H, W)                           (N, H, W, C)
Linear weight      (out, in)                              Dense kernel (in, out)
Conv weight        (O, I, kH, kW)  "OIHW"                 Conv kernel (kH, kW, I, O)  "HWIO"
BN momentum        new = (1-m)*old + m*batch, m=0.1       new = m*old + (1-m)*batch, m=0.9
flatten            channel-major (C, H, W)                channel-minor (H, W, C)
=================  =====================================  ====================================
"""

from __future__ import annotations

import dataclasses

import numpy as np

import flaxbn.config as fcfg
import torchbn.config as tcfg


@dataclasses.dataclass(frozen=True)
class Precision:
    """A compute precision, as each framework spells it. ``float32``: everything in float32.
    ``bfloat16``: mixed precision, bfloat16 matmuls and convolutions with float32 parameters
    and BatchNorm statistics: torch's ``autocast``, Flax's ``compute_dtype``."""

    name: str

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.name!r}")

    @property
    def mixed(self) -> bool:
        return self.name == "bfloat16"

    def torch_dtype(self):
        import torch

        return torch.bfloat16 if self.mixed else torch.float32

    def jax_dtype(self):
        import jax.numpy as jnp

        return jnp.bfloat16 if self.mixed else jnp.float32

    def autocast(self, device_type: str):
        """``torch.autocast`` for mixed precision on ``device_type`` ("cpu"/"cuda"), else a no-op."""
        import torch

        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.mixed)


PRECISIONS = ("float32", "bfloat16")


def torch_to_flax_momentum(momentum: float) -> float:
    """torch's weight of the *new* batch -> Flax's weight of the *old* running value."""
    if momentum is None:
        raise ValueError(
            "torch momentum=None (cumulative moving average) has no stock Flax equivalent; give a float in [0, 1]"
        )
    return round(1.0 - momentum, 12)  # round: 1 - 0.9 is 0.09999999999999998 in binary


def flax_to_torch_momentum(momentum: float) -> float:
    """Flax's weight of the *old* running value -> torch's weight of the *new* batch."""
    return round(1.0 - momentum, 12)


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))  # (N, C, H, W) -> (N, H, W, C)


def to_flax_input(x: np.ndarray) -> np.ndarray:
    """A model input or activation in Flax's layout: images (N, C, H, W) -> (N, H, W, C);
    (N, features) stays as it is."""
    return nchw_to_nhwc(x) if x.ndim == 4 else x


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)


def linear_to_dense(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)  # (out, in) -> (in, out)


def dense_to_linear(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T)  # (in, out) -> (out, in)


def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))  # (O, I, kH, kW) -> (kH, kW, I, O)


def hwio_to_oihw(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(k, (3, 2, 0, 1)))  # (kH, kW, I, O) -> (O, I, kH, kW)


def oiw_to_wio(w: np.ndarray) -> np.ndarray:
    """Conv1d kernel: (out, in, width) -> (width, in, out)."""
    return np.transpose(w, (2, 1, 0))


def wio_to_oiw(k: np.ndarray) -> np.ndarray:
    """Inverse of :func:`oiw_to_wio`."""
    return np.transpose(k, (2, 1, 0))


def flattened_linear_to_dense(w: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Kernel of the first Linear after a flatten: torch flattens (C, H, W), Flax (H, W, C).

    The input features are permuted so that both sides see the same weight per pixel and
    channel, then transposed like any Linear.
    """
    c, h, w_ = chw
    out = w.shape[0]
    w = w.reshape(out, c, h, w_).transpose(0, 2, 3, 1)  # (O, C, H, W) -> (O, H, W, C)
    return linear_to_dense(w.reshape(out, h * w_ * c))


def dense_to_flattened_linear(k: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`flattened_linear_to_dense`."""
    c, h, w_ = chw
    w = dense_to_linear(k)
    out = w.shape[0]
    w = w.reshape(out, h, w_, c).transpose(0, 3, 1, 2)  # (O, H, W, C) -> (O, C, H, W)
    return np.ascontiguousarray(w.reshape(out, c * h * w_))


def flax_config(cfg: tcfg.ModelConfig, bn_semantics: str = "flax", compute_dtype: str = "float32") -> fcfg.ModelConfig:
    """The Flax twin of a torch configuration: same fields, momentum in Flax's direction.

    ``momentum=None`` (torch's cumulative average) needs ``bn_semantics="torch"``.
    """
    fields = dataclasses.asdict(cfg)
    if cfg.bn_momentum is None and bn_semantics == "torch":
        fields["bn_momentum"] = None
    else:
        fields["bn_momentum"] = torch_to_flax_momentum(cfg.bn_momentum)
    return fcfg.twin(type(cfg))(**fields, bn_semantics=bn_semantics, compute_dtype=compute_dtype)


def torch_config(cfg: fcfg.ModelConfig) -> tcfg.ModelConfig:
    """The torch twin of a Flax configuration (``bn_semantics`` and ``compute_dtype`` have
    no torch field: torch picks mixed precision with autocast at the call site)."""
    flax_only = {f.name for f in dataclasses.fields(fcfg.FlaxSettings)} - {"bn_momentum"}
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in flax_only}
    fields["bn_momentum"] = None if cfg.bn_momentum is None else flax_to_torch_momentum(cfg.bn_momentum)
    return tcfg.KINDS[type(cfg).__name__](**fields)
