"""What every figure shares: matplotlib's Agg backend (no display needed) and one way
to save a figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from compare.io.files import atomic_path

__all__ = ["plt", "save"]


def save(fig, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (``compare.io.files.atomic_path``:
    a link or a device at ``path`` is refused, never written through)."""
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path
