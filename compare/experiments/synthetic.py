"""A synthetic image task that ships without a download, whose difficulty its parameters
set, generated from the seed with numpy alone: the same arrays for torch and for Flax.

Each class has a prototype: a smooth random pattern (white noise blurred by a binomial
filter), a mixture of one pattern shared by every class and one of its own
(``similarity``: the shared part's weight; 0 gives unrelated classes, near 1 nearly equal
ones). An image of a class is its prototype, shifted by up to ``shift`` pixels in each
direction, scaled by a contrast drawn from ``contrast``, plus white noise of standard
deviation ``noise`` (the prototypes have unit standard deviation). Harder: more noise,
more similar classes, larger shifts, more classes. Classes are balanced.
"""

from __future__ import annotations

import numpy as np

SYNTHETIC_STREAM = 2**31 + 3  # compare.experiments.data's stream tag for the synthetic images

DEFAULTS = dict(n=1800, size=8, classes=10, noise=1.0, similarity=0.3, shift=1, contrast=(0.7, 1.3), blur=2)


def _blur(a: np.ndarray, passes: int) -> np.ndarray:
    """A separable [1, 2, 1] / 4 filter ``passes`` times over the last two axes (edges replicated)."""
    for _ in range(passes):
        p = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
        a = (p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]) / 4  # rows: (.., n + 2, n + 2) -> (.., n, n + 2)
        a = (a[..., :-2] + 2 * a[..., 1:-1] + a[..., 2:]) / 4  # columns -> (.., n, n)
    return a


def _unit(a: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    return a / a.std(axis=(-2, -1), keepdims=True)


def images(
    seed: int,
    *,
    n: int = DEFAULTS["n"],
    size: int = DEFAULTS["size"],
    classes: int = DEFAULTS["classes"],
    noise: float = DEFAULTS["noise"],
    similarity: float = DEFAULTS["similarity"],
    shift: int = DEFAULTS["shift"],
    contrast: tuple[float, float] = DEFAULTS["contrast"],
    blur: int = DEFAULTS["blur"],
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (N, 1, size, size) float32 and their labels (N,) int64, from ``seed``."""
    problems = []
    if n < classes or classes < 2:
        problems.append(f"n = {n} and classes = {classes}: at least two classes and one image per class")
    if size < 2 or shift < 0 or blur < 0:
        problems.append(f"size {size} >= 2, shift {shift} >= 0 and blur {blur} >= 0")
    if not 0.0 <= similarity < 1.0 or noise < 0:
        problems.append(f"similarity {similarity} in [0, 1) and noise {noise} >= 0")
    if not 0 < contrast[0] <= contrast[1]:
        problems.append(f"contrast {contrast}: 0 < low <= high")
    if problems:
        raise ValueError("synthetic images: " + "; ".join(problems))
    rng = np.random.default_rng([seed, SYNTHETIC_STREAM])
    side = size + 2 * shift
    shared = _unit(_blur(rng.standard_normal((1, side, side)), blur))
    own = _unit(_blur(rng.standard_normal((classes, side, side)), blur))
    protos = _unit(np.sqrt(similarity) * shared + np.sqrt(1.0 - similarity) * own)  # (classes, side, side)
    labels = rng.permutation(np.arange(n) % classes)
    dy, dx = rng.integers(0, 2 * shift + 1, (2, n))
    rows = dy[:, None] + np.arange(size)  # (n, size): each image's window into its prototype
    cols = dx[:, None] + np.arange(size)
    crops = protos[labels[:, None, None], rows[:, :, None], cols[:, None, :]]
    scale = rng.uniform(*contrast, n)[:, None, None]
    x = scale * crops + noise * rng.standard_normal((n, size, size))
    return x[:, None].astype(np.float32), labels.astype(np.int64)
