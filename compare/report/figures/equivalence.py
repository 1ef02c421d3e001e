"""The equivalence figures: how far torch and Flax training runs drift apart, step by step."""

from __future__ import annotations

from pathlib import Path

from compare.report.figures.style import figure, save


def divergence(records: list[dict], path: Path) -> Path | None:
    """Per-step max relative parameter difference, torch vs Flax, float32 and float64."""
    curves = [r for r in records if r.get("divergence_float32")]
    if not curves:
        return None
    fig, ax = figure(figsize=(8, 4.5))
    for r in curves:
        label = f"{r['model']} / {r['flax_api']}"
        steps = range(1, len(r["divergence_float32"]) + 1)
        (line,) = ax.plot(steps, r["divergence_float32"], label=f"{label}, float32")
        ax.plot(steps, r["divergence_float64"], linestyle="--", color=line.get_color(), label=f"{label}, float64")
    ax.set_yscale("log")
    ax.set_xlabel("training step (same weights, batches and dropout masks)")
    ax.set_ylabel("max relative difference of parameters and statistics")
    ax.set_title("torch vs Flax training trajectories (linen and nnx coincide)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, path)
