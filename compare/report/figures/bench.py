"""The benchmark's figures: throughput (against batch size where a sweep has several, bars
where it has one), the speed-up of the best JAX implementation over the best PyTorch one,
and compile time against step time. Every implementation has one colour in every panel and
figure (``style.IMPL_COLOURS``) and each figure one legend that names them."""

from __future__ import annotations

from pathlib import Path

from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from compare.bench.sweep import speedups
from compare.report.figures.style import figure, impl_colour, save


def _legend(fig, impls: list[str]) -> None:
    handles = [Line2D([], [], color=impl_colour(i), lw=6, label=i) for i in impls]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="implementation", title_fontsize=8)


def _order(impls) -> list[str]:
    """JAX implementations first, then PyTorch's, each alphabetically."""
    return sorted(set(impls), key=lambda i: (not i.startswith("jax"), i))


def throughput(records: list[dict], path: Path) -> Path | None:
    """samples/s per (model, dtype) panel: log-log lines against the batch size where the
    sweep has several, one bar per implementation where it has one."""
    panels = sorted({(r["model"], r["dtype"]) for r in records})
    if not panels:
        return None
    fig, axes = figure(1, len(panels), figsize=(3.6 * len(panels) + 2.0, 3.8), squeeze=False)
    for ax, (model, dtype) in zip(axes[0], panels, strict=True):
        recs = [r for r in records if (r["model"], r["dtype"]) == (model, dtype)]
        batches = sorted({r["batch_size"] for r in recs})
        if len(batches) == 1:
            recs = sorted(recs, key=lambda r: r["samples_per_s"])
            ax.barh(
                [r["impl"] for r in recs],
                [r["samples_per_s"] for r in recs],
                color=[impl_colour(r["impl"]) for r in recs],
            )
            ax.set_xlabel("training samples / s")
            ax.set_title(f"{model} ({dtype}), batch {batches[0]}", fontsize=10)
            ax.tick_params(axis="y", labelsize=8)
            continue
        for impl in _order(r["impl"] for r in recs):
            pts = sorted((r["batch_size"], r["samples_per_s"]) for r in recs if r["impl"] == impl)
            ax.plot(
                *zip(*pts, strict=True),
                "-" if impl.startswith("jax") else "--",
                marker="o",
                ms=3,
                color=impl_colour(impl),
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("training samples / s")
        ax.set_title(f"{model} ({dtype})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    _legend(fig, _order(r["impl"] for r in records))
    fig.suptitle(f"training throughput on {records[0]['device']} (more is better)")
    return save(fig, path)


def speedup(records: list[dict], path: Path) -> Path | None:
    """The best JAX implementation's samples/s over the best PyTorch one's, per group (one
    bar each: the figure for a sweep with one batch size per model); groups measured on a
    busy machine are hatched and say so."""
    rows = speedups(records)
    if not rows:
        return None
    fig, ax = figure(figsize=(8, 0.6 * len(rows) + 1.6))
    labels = [f"{r['model']} {r['dtype']} b{r['batch_size']}\n{r['best_jax']} vs {r['best_torch']}" for r in rows]
    bars = ax.barh(labels, [r["speedup"] for r in rows], color=[impl_colour(r["best_jax"]) for r in rows])
    for bar, r in zip(bars, rows, strict=True):
        if r.get("busy"):
            bar.set_hatch("//")
        note = f" {r['speedup']:.2f}x" + (" (busy machine)" if r.get("busy") else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(min(0.5, min(r["speedup"] for r in rows) / 1.5), max(2.0, max(r["speedup"] for r in rows)) * 6)
    ax.tick_params(axis="y", labelsize=8)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, 1, 10: not 10^0
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("best JAX / best PyTorch, samples/s (right of 1: JAX faster)")
    ax.set_title("speed-up per group (bar colour: the winning JAX implementation)", fontsize=10)
    return save(fig, path)


def compile_vs_steady(records: list[dict], path: Path) -> Path | None:
    """Per (model, dtype) at its largest batch: compile time and steady-state step time."""
    if not records:
        return None
    keys = sorted({(r["model"], r["dtype"]) for r in records})
    fig, axes = figure(2, len(keys), figsize=(3.6 * len(keys) + 2.0, 6), squeeze=False)
    for col, (model, dtype) in enumerate(keys):
        recs = [r for r in records if (r["model"], r["dtype"]) == (model, dtype)]
        batch = max(r["batch_size"] for r in recs)
        recs = sorted(
            (r for r in recs if r["batch_size"] == batch), key=lambda r: (not r["impl"].startswith("jax"), r["impl"])
        )
        names, colours = [r["impl"] for r in recs], [impl_colour(r["impl"]) for r in recs]
        axes[0][col].barh(names, [r["compile_s"] for r in recs], color=colours)
        axes[0][col].set_title(f"{model} ({dtype}), batch {batch}", fontsize=10)
        axes[0][col].set_xlabel("compile: time to first step (s)")
        axes[1][col].barh(names, [r["step_ms_median"] for r in recs], color=colours)
        axes[1][col].set_xlabel("steady state: median step (ms)")
        for ax in axes[:, col]:
            ax.tick_params(axis="y", labelsize=8)
    _legend(fig, _order(r["impl"] for r in records))
    return save(fig, path)
