"""Cross-framework facts: layouts, convolution padding, and GPU float32 precision.
(Same weights give the same eval outputs: ``test_equivalence.py``.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from compare import conventions

spec = pytest.mark.spec
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or jax.default_backend() != "gpu",
    reason="GPU-only fact: needs CUDA torch and CUDA jax",
)


def _conv_pair(stride: int, padding, *, size: int = 32, kernel: int = 7, torch_padding: int = 3) -> float:
    """max |torch conv - flax conv| for a conv with torch's symmetric ``torch_padding`` and the
    given Flax padding (inf when the output sizes differ)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, size, size)).astype(np.float32)  # (N, C, H, W)
    w = rng.standard_normal((8, 3, kernel, kernel)).astype(np.float32)  # OIHW
    expected = torch.nn.functional.conv2d(
        torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=torch_padding
    ).numpy()
    conv = nn.Conv(8, (kernel, kernel), strides=(stride, stride), padding=padding, use_bias=False)
    y = conv.apply({"params": {"kernel": conventions.oihw_to_hwio(w)}}, jnp.asarray(conventions.nchw_to_nhwc(x)))
    got = conventions.nhwc_to_nchw(np.asarray(y))
    return float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")


@spec("cross.conv_padding.flax_same_differs_from_torch_at_stride_2")
def test_flax_default_same_padding_breaks_equivalence_when_the_total_padding_is_odd():
    """'SAME' pads (2, 3) for k=7, s=2 on 32 (the extra pad on the high side); torch pads
    (3, 3). Ported models state padding explicitly (google/flax#2993)."""
    assert nn.Conv(8, (3, 3)).padding == "SAME"
    assert torch.nn.Conv2d(3, 8, 3).padding == (0, 0)
    assert _conv_pair(1, "SAME") < 1e-4  # stride 1: 'SAME' is symmetric, same result (measured 4e-6)
    assert _conv_pair(2, "SAME") > 1.0  # stride 2: shifted window, measured ~10
    assert _conv_pair(2, ((3, 3), (3, 3))) < 1e-4  # explicit torch padding: measured 4e-6
    # 'SAME' pads (total // 2, total - total // 2): torch's symmetric padding when the total is
    # even. k3 s2 (torch padding=1): on 33 the total is 2 and they agree; on 32 it is 1
    assert _conv_pair(2, "SAME", size=33, kernel=3, torch_padding=1) < 1e-4
    assert _conv_pair(2, "SAME", size=32, kernel=3, torch_padding=1) > 1.0  # windows shifted by one: measured 34
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        torch.nn.Conv2d(3, 8, 3, stride=2, padding="same")


@spec("cross.layout.nchw_vs_nhwc")
def test_torch_is_channels_first_and_flax_channels_last():
    """The layers themselves: torch's Conv2d reads (N, C, H, W) with an (O, I, kH, kW)
    kernel, Flax's Conv reads (N, H, W, C) with (kH, kW, I, O); with the layouts converted
    they compute the same map, and an NCHW array fed to Flax as it is fails."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 5)).astype(np.float32)  # NCHW
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)  # OIHW
    want = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=1).numpy()
    conv = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    variables = {"params": {"kernel": conventions.oihw_to_hwio(w)}}  # (kH, kW, I, O)
    got = conv.apply(variables, jnp.asarray(conventions.nchw_to_nhwc(x)))
    assert got.shape == (2, 6, 5, 8)  # channels last
    np.testing.assert_allclose(conventions.nhwc_to_nchw(np.asarray(got)), want, rtol=1e-5, atol=1e-5)  # measured 2e-6
    with pytest.raises(Exception, match="(?i)shape|dimension|channel"):
        conv.apply(variables, jnp.asarray(x))  # 3 "width" columns read as channels: 5 != 3


@spec("cross.gpu.torch_cudnn_tf32_on_by_default")
def test_torch_uses_tf32_in_cudnn_convolutions_by_default_but_not_in_matmuls():
    """The flags exist (and are read) on every build; they take effect on Ampere and newer GPUs."""
    assert torch.backends.cudnn.allow_tf32 is True
    assert torch.backends.cuda.matmul.allow_tf32 is False


@spec("cross.gpu.jax_default_precision_is_not_true_float32")
@needs_gpu
def test_jax_default_matmul_precision_on_gpu_is_lower_than_highest():
    """JAX's DEFAULT precision uses TF32 on Ampere and newer (jax#18934): a large float32
    matmul differs from the 'highest' one far beyond float32 rounding."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((1024, 1024)).astype(np.float32)) for _ in range(2))
    default = np.asarray(a @ b)
    highest = np.asarray(jnp.matmul(a, b, precision="highest"))
    assert np.max(np.abs(default - highest)) > 1e-3  # TF32 keeps 10 mantissa bits
