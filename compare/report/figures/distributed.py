"""The distributed suite's figures: step times with 1 and 2 processes, and the paper
model's communication time against the H100 step time."""

from __future__ import annotations

from pathlib import Path

from compare.report.figures.style import plt, save


def step_times(records: list[dict], path: Path) -> Path | None:
    """Median step time (p10-p90 bars) per (framework, model): 1 and 2 processes,
    per-device and synchronised BatchNorm side by side."""
    panels = sorted({(r["framework"], r["model"]) for r in records})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), squeeze=False)
    for ax, (framework, model) in zip(axes[0], panels, strict=True):
        recs = sorted((r for r in records if (r["framework"], r["model"]) == (framework, model)),
                      key=lambda r: (r["processes"], r["bn_mode"]))  # fmt: skip
        labels = [f"{r['processes']}p\n{'sync' if r['bn_mode'] == 'sync' else 'per-dev'}" for r in recs]
        medians = [r["step_ms_median"] for r in recs]
        low = [r["step_ms_median"] - r["step_ms_p10"] for r in recs]
        high = [r["step_ms_p90"] - r["step_ms_median"] for r in recs]
        colors = ["tab:orange" if r["bn_mode"] == "sync" else "tab:blue" for r in recs]
        ax.bar(range(len(recs)), medians, yerr=[low, high], color=colors, capsize=3)
        ax.set_xticks(range(len(recs)), labels, fontsize=8)
        ax.set_title(f"{framework} {model} ({recs[0]['batch_per_device']}/device)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("ms per step (median, p10-p90)")
    load = max(r["load_avg"] for r in records)
    fig.suptitle(f"one device (one core) per process, {records[0]['cpu_count']} cores, load average up to {load:.1f}",
                 fontsize=9)  # fmt: skip
    return save(fig, path)


def comm_model(records: list[dict], path: Path) -> Path | None:
    """The paper model: communication per step as a fraction of the H100 step, per link,
    for each (model, framework); synchronised BatchNorm's critical part hatched."""
    keys = sorted({(r["model"], r["framework"]) for r in records})
    if not keys:
        return None
    links = list(dict.fromkeys(r["link"] for r in records))
    fig, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links), 3.8), squeeze=False, sharey=True)
    for ax, link in zip(axes[0], links, strict=True):
        for i, key in enumerate(keys):
            for j, mode in enumerate(("per_device", "sync")):
                r = next((r for r in records if (r["model"], r["framework"], r["link"], r["bn_mode"]) == (*key, link, mode)), None)  # fmt: skip
                if r is None:
                    continue
                x = i + (j - 0.5) * 0.38
                ax.bar(x, r["comm_fraction"], width=0.36, color="tab:orange" if mode == "sync" else "tab:blue")
                ax.bar(x, r["critical_fraction"], width=0.36, fill=False, hatch="//", edgecolor="black")
        ax.set_xticks(range(len(keys)), ["\n".join([*m.split("_"), f]) for m, f in keys], fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{link}, {records[0]['gpus']} GPUs", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("communication / H100 step time")
    fig.suptitle("paper model (blue: per-device BN, orange: synchronised; hatched: no overlap possible)", fontsize=9)
    return save(fig, path)
