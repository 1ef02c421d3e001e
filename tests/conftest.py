"""Shared fixtures and the one tree-comparison helper of the suite."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np
import pytest
import torch

from compare import registry

# the models every numeric test runs at full size; the Bottleneck family (resnet50 and up) is
# tested at full size for keys and shapes only, numerically on reduced variants (test_bottleneck.py)
MODELS = ["mlp", "cnn", "resnet18", "resnet34", "resnet18_cifar"]
APIS = ["linen", "nnx"]


def random_state_dict(spec: registry.ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict of ``spec`` with every float random (variances positive) and random
    batch counters: nothing a swapped or dropped tensor could hide behind."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in spec.build_torch().state_dict().items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.randint(0, 100_000, (), generator=gen, dtype=torch.int64)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(t.shape, generator=gen) + 0.5
        else:
            sd[key] = torch.randn(t.shape, generator=gen)
    return sd


def assert_flat_equal(actual: dict, expected: dict) -> None:
    """Same keys first (listing the differences), then bit-exact values and dtypes."""
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    assert not missing and not extra, f"key sets differ: missing {missing}, unexpected {extra}"
    for key in expected:
        a, e = actual[key], expected[key]
        a = a.numpy() if isinstance(a, torch.Tensor) and a.dtype != torch.bfloat16 else a
        e = e.numpy() if isinstance(e, torch.Tensor) and e.dtype != torch.bfloat16 else e
        if isinstance(a, torch.Tensor) or isinstance(e, torch.Tensor):  # bfloat16: compare as tensors
            assert a.dtype == e.dtype, f"{key}: dtype {a.dtype} != {e.dtype}"
            assert torch.equal(a, e), f"{key}: values differ"
            continue
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype, f"{key}: dtype {a.dtype} != {e.dtype}"
        np.testing.assert_array_equal(a, e, err_msg=key)


@pytest.fixture(params=MODELS)
def spec(request) -> registry.ModelSpec:
    return registry.get(request.param)
