"""What every figure shares: matplotlib's Agg backend (no display needed), one colour per
benchmark implementation in every panel of every figure (JAX in blues and greens, PyTorch
in reds and oranges), a layout that keeps every label on the canvas, and one way to save.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from compare.io.files import atomic_path

__all__ = ["IMPL_COLOURS", "clipped_texts", "figure", "impl_colour", "plt", "save"]

# one colour per implementation, the same everywhere; two families, so the framework reads at a glance
IMPL_COLOURS = {
    "jax-linen-jit": "#1f4e99",
    "jax-scan": "#4a90d9",
    "jax-nnx-split": "#1b7f5b",
    "jax-nnx-cached": "#52b788",
    "jax-nnx-jit": "#95d5b2",
    "torch-eager": "#b22222",
    "torch-compile": "#e8590c",
    "torch-compile-cudagraphs": "#f4a259",
}
_SPARE = {"jax": ["#6c8ebf", "#2a9d8f", "#264653"], "torch": ["#9d0208", "#dc2f02", "#ffba08"]}


def impl_colour(impl: str) -> str:
    """The colour of an implementation; an unknown one gets a spare of its family's, stably."""
    if impl in IMPL_COLOURS:
        return IMPL_COLOURS[impl]
    family = _SPARE["jax" if impl.startswith("jax") else "torch"]
    return family[sum(map(ord, impl)) % len(family)]


def figure(*args, **kwargs):
    """``plt.subplots`` with constrained layout: axes, labels and an outside legend are
    fitted inside the canvas."""
    return plt.subplots(*args, layout="constrained", **kwargs)


def _drawn_texts(fig) -> list:
    """The texts a draw of ``fig`` shows: tick labels of the ticks in view only (matplotlib
    keeps label objects for ticks outside the limits, which are not drawn)."""
    tick_labels, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            tick_labels |= {
                id(t) for tick in axis.get_major_ticks() + axis.get_minor_ticks() for t in (tick.label1, tick.label2)
            }
            for tick in axis._update_ticks():  # the ticks this draw shows
                drawn += [t for t in (tick.label1, tick.label2) if t.get_visible()]
    others = [t for t in fig.findobj(matplotlib.text.Text) if id(t) not in tick_labels and t.get_visible()]
    return [t for t in drawn + others if t.get_text().strip()]


def clipped_texts(fig) -> list[str]:
    """Every text a draw of ``fig`` shows (titles, labels, tick labels, legends, notes) that
    does not lie wholly on the canvas, by its text; empty when nothing is cut off."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    out = []
    for text in _drawn_texts(fig):
        box = text.get_window_extent(renderer)
        if box.x0 < canvas.x0 - 1 or box.y0 < canvas.y0 - 1 or box.x1 > canvas.x1 + 1 or box.y1 > canvas.y1 + 1:
            out.append(text.get_text())
    return out


def save(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (``compare.io.files.atomic_path``:
    a link or a device at ``path`` is refused, never written through)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path
