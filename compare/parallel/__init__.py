"""Data parallelism on the real engines: several JAX processes under ``jax.distributed``
and torch under torchrun, on this machine, checked against one device; checkpoints and
faults across processes; what synchronised BatchNorm costs. ``docs/distributed.md``.

* ``launch``: starts a job's processes (JAX workers, or torchrun), watches them, stops
  them all when one dies and names it.
* ``jax_worker``, ``torch_worker``: one process of a job (the tasks it can run).
* ``jax_checks``, ``torch_checks``: the checks, run inside the processes.
* ``checkpoint``: one writer, atomic; whose BatchNorm statistics a checkpoint holds.
* ``cost``: collectives and bytes per step (counted from the compiled programs and the
  torch profiler), the paper model for a GPU cluster, and the step-time measurement.
* ``suite``: the ``distributed`` suite of ``compare.run``.

This file holds the inputs both frameworks' jobs share (numpy only).
"""

from __future__ import annotations

import numpy as np

UNEVEN_COUNTS = (2, 6, 8, 3, 5, 1, 7, 4)  # valid rows of device d, cycled


def uneven_shards(devices: int, rows: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``devices`` shards of ``rows`` rows and 3 channels, shard d holding
    ``UNEVEN_COUNTS[d]`` valid rows around ``10 * d``, the rest padding (zeros): one
    (devices * rows, 3) float32 array and its (devices * rows, 1) mask of valid rows."""
    x = np.zeros((devices, rows, 3), np.float32)
    valid = np.zeros((devices, rows, 1), bool)
    for d in range(devices):
        n = UNEVEN_COUNTS[d % len(UNEVEN_COUNTS)]
        x[d, :n] = 10.0 * d + np.arange(3 * n, dtype=np.float32).reshape(n, 3) * 0.1
        valid[d, :n] = True
    return x.reshape(-1, 3), valid.reshape(-1, 1)


GLOBAL_BATCH = 32  # rows per training step, whatever the device count
STEP_SEED = 100


def train_spec(dropout: float):
    """The small mlp the training, resume and fault tasks train (12 -> 16 -> 8 -> 10)."""
    from compare import registry

    return registry.get("mlp").replace(in_features=12, hidden=(16, 8), dropout=dropout)


def train_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    """The global batch of training step ``step``, the same in every process of either
    framework (each feeds only its own rows): float32 (32, 12) inputs, int32 labels."""
    rng = np.random.default_rng(STEP_SEED + step)
    x = (rng.standard_normal((GLOBAL_BATCH, 12)) * 2 + 0.5).astype(np.float32)
    return x, rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)
