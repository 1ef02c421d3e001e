"""The peaks that MFU is measured against: the matmul rate measured on this device in the
same run (the better of torch and JAX), and the card's datasheet peak where it is known.

Datasheet figures are dense (no 2:4 sparsity) tensor-core TFLOP/s from NVIDIA's product
pages: bfloat16, and TF32 for float32 work (the benchmark runs float32 with TF32 on both
sides on GPU). They are keyed by a fragment of ``torch.cuda.get_device_name()``.
"""

from __future__ import annotations

from compare.bench import runners_jax, runners_torch

# device name fragment -> {dtype: dense TFLOP/s}; the first fragment found in the name wins
DATASHEET_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "H100 SXM": {"bfloat16": 989.4, "float32": 494.7},
    "H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},  # the SXM card's usual name
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100 NVL": {"bfloat16": 835.5, "float32": 417.8},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def datasheet(device_name: str, dtype: str) -> float | None:
    """The datasheet peak of ``device_name`` for ``dtype``, or None (CPUs, unknown cards)."""
    for fragment, peaks in DATASHEET_TFLOPS.items():
        if fragment in device_name:
            return peaks.get(dtype)
    return None


def measure(dtypes, device: str, n: int) -> dict[str, float]:
    """The device's achieved matmul TFLOP/s per dtype: the better of torch and JAX."""
    return {
        d: max(runners_torch.peak_matmul_tflops(d, device, n), runners_jax.peak_matmul_tflops(d, device, n))
        for d in dtypes
    }
