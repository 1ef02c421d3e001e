"""What the claims' and the training runs' figures share: one look per framework (torch
solid with circles, linen dashed with squares), one colour per arm, a band that aggregates
the seeds (mean and range), plain log ticks, constrained layout and its saving."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.colors as mc
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from compare.report.figures.style import plt

FRAMEWORKS = ("torch", "linen")
LINE = {"torch": "-", "linen": "--"}
MARK = {"torch": "o", "linen": "s"}
ARM_COLOUR = {"BatchNorm": "tab:blue", "plain": "tab:grey", "Dropout": "tab:orange", "noisy BatchNorm": "tab:red"}


def save(fig, path: Path) -> Path:
    """Constrained layout (the figure's own), no tight_layout."""
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def legend(fig, handles, labels) -> None:
    """One legend under the panels, as many columns as the figure's width holds."""
    columns = max(1, min(len(handles), int(fig.get_figwidth() / 2.7)))
    fig.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=7)


def log_plain(axis) -> None:
    """A log axis with its ticks written plainly (0.5, 1, 2, not 5 x 10^-1): 1-2-5 within
    two decades, powers of ten over more."""
    low, high = sorted(axis.get_view_interval())
    decades = np.log10(high / low) if low > 0 else 3
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(plain))
    axis.set_minor_formatter(NullFormatter())


def band(ax, x, rows: list[list[float]], colour, fw: str, label: str | None, spread: bool = True) -> None:
    """Mean over seeds with the seeds' range (``spread``). A shorter row (a run that diverged
    and stopped) and NaN values drop out of the points they do not reach."""
    rows = [r for r in rows if len(r)]
    if not rows:
        return
    n = min(len(x), max(len(r) for r in rows))
    a = np.full((len(rows), n), np.nan)
    for i, r in enumerate(rows):
        a[i, : min(n, len(r))] = np.asarray(r[:n], dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column of NaN (every seed diverged): not drawn
        mean, low, high = np.nanmean(a, 0), np.nanmin(a, 0), np.nanmax(a, 0)
    x = np.asarray(x)[:n]
    ax.plot(x, mean, LINE[fw], marker=MARK[fw], ms=3, markevery=max(1, n // 12), color=colour, label=label)
    if spread:
        ax.fill_between(x, low, high, color=colour, alpha=0.12 if fw == "torch" else 0.07, lw=0)


def darker(colour) -> tuple:
    r, g, b = mc.to_rgb(colour)
    return (0.55 * r, 0.55 * g, 0.55 * b)


def plain(x: float, _pos=None) -> str:
    """A tick written plainly: 0.5, 3, -10."""
    return f"{x:g}"
