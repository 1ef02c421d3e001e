"""The benchmark's figures: throughput against batch size, compile time against step time."""

from __future__ import annotations

from pathlib import Path

from compare.report.figures.style import plt, save


def throughput(records: list[dict], path: Path) -> Path | None:
    """samples/s against batch size, log-log, one panel per (model, dtype), one line per impl."""
    panels = sorted({(r["model"], r["dtype"]) for r in records})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (model, dtype) in zip(axes[0], panels, strict=True):
        recs = [r for r in records if (r["model"], r["dtype"]) == (model, dtype)]
        for impl in sorted({r["impl"] for r in recs}):
            pts = sorted((r["batch_size"], r["samples_per_s"]) for r in recs if r["impl"] == impl)
            style = "-" if impl.startswith("jax") else "--"
            ax.plot(*zip(*pts, strict=True), style, marker="o", markersize=3, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{model} ({dtype})")
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("training samples / s")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"training throughput on {records[0]['device']} (solid: JAX, dashed: PyTorch)")
    return save(fig, path)


def compile_vs_steady(records: list[dict], path: Path) -> Path | None:
    """Per (model, dtype) at its largest batch: compile time and steady-state step time."""
    if not records:
        return None
    keys = sorted({(r["model"], r["dtype"]) for r in records})
    fig, axes = plt.subplots(2, len(keys), figsize=(4.2 * len(keys), 6), squeeze=False)
    for col, (model, dtype) in enumerate(keys):
        recs = [r for r in records if (r["model"], r["dtype"]) == (model, dtype)]
        batch = max(r["batch_size"] for r in recs)
        recs = sorted((r for r in recs if r["batch_size"] == batch), key=lambda r: r["impl"])
        names = [r["impl"] for r in recs]
        axes[0][col].barh(names, [r["compile_s"] for r in recs], color="tab:orange")
        axes[0][col].set_title(f"{model} ({dtype}), batch {batch}")
        axes[0][col].set_xlabel("compile: time to first step (s)")
        axes[1][col].barh(names, [r["step_ms_median"] for r in recs], xerr=None, color="tab:blue")
        axes[1][col].set_xlabel("steady state: median step (ms)")
    return save(fig, path)
