"""The benchmark: one training step timed honestly in every implementation.

``sweep`` (what to run, the timing loop, the speed-up table), ``runners_torch`` and
``runners_jax`` (one runner per implementation), ``flops`` (the analytic FLOP count),
``memory`` (peak memory). The names of the flat ``compare.bench`` module before 0.2
(``run``, ``SWEEPS``, ``bench_group``, ``speedups``, ...) are re-exported here.
"""

from compare.bench.sweep import (
    SKIP_REASONS,
    SWEEPS,
    Sweep,
    all_implementations,
    bench_group,
    measure_peaks,
    run,
    speedups,
)

__all__ = [
    "SKIP_REASONS",
    "SWEEPS",
    "Sweep",
    "all_implementations",
    "bench_group",
    "measure_peaks",
    "run",
    "speedups",
]
