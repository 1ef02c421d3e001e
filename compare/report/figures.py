"""Every figure of a run, drawn from its results into its folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compare.report import claim_plots, plots


def draw_all(results: dict[str, Any], folder: Path) -> None:
    """The figures whose records are in ``results``; a figure without data is not drawn."""
    folder = Path(folder)
    plots.divergence(results.get("train_equivalence", []), folder / "train_divergence.png")
    plots.throughput(results.get("bench", []), folder / "bench_throughput.png")
    plots.compile_vs_steady(results.get("bench", []), folder / "bench_compile_vs_steady.png")
    plots.learning_curves(results.get("train", []), folder / "train_learning_curves.png")
    plots.accuracy_vs_lr(results.get("train", []), folder / "train_accuracy_vs_lr.png")
    plots.gap_vs_dropout(results.get("train", []), folder / "train_gap_vs_dropout.png")
    claims = results["meta"].get("train_summary", {}).get("claims", [])
    claim_plots.draw_all(results.get("train", []), claims, folder)
