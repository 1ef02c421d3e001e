"""Every figure of a run, drawn from its results into its folder: one module per job
(``bench``, ``equivalence``, ``training``, ``claims``, ``distributed``), ``style`` for what
they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compare.report.figures import bench, claims, distributed, equivalence, training


def draw_all(results: dict[str, Any], folder: Path) -> None:
    """The figures whose records are in ``results``; a figure without data is not drawn."""
    folder = Path(folder)
    equivalence.divergence(results.get("train_equivalence", []), folder / "train_divergence.png")
    bench.throughput(results.get("bench", []), folder / "bench_throughput.png")
    bench.speedup(results.get("bench", []), folder / "bench_speedup.png")
    bench.compile_vs_steady(results.get("bench", []), folder / "bench_compile_vs_steady.png")
    training.learning_curves(results.get("train", []), folder / "train_learning_curves.png")
    training.accuracy_vs_lr(results.get("train", []), folder / "train_accuracy_vs_lr.png")
    training.gap_vs_dropout(results.get("train", []), folder / "train_gap_vs_dropout.png")
    distributed.step_times(results.get("distributed_steps", []), folder / "distributed_step_times.png")
    distributed.comm_model(results.get("distributed_comm_model", []), folder / "distributed_comm_model.png")
    verdicts = results["meta"].get("train_summary", {}).get("claims", [])
    claims.draw_all(results.get("train", []), verdicts, folder)
