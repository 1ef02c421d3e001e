"""Intervals and verdicts for the lesson's claims.

Every claim is measured as one number per seed, the *effect*, signed so that a positive
value is what the lesson claims (fewer steps with BatchNorm, a smaller generalisation gap
with Dropout, ...). The seeds are paired: both arms of a seed start from the same
weights and see the same batches, so the per-seed difference removes most of the
seed-to-seed noise. The interval is the 95% Student-t interval of the mean of those
differences (``mean +- t(0.975, n - 1) * sd / sqrt(n)``), the paired t-test's interval.

The verdict compares the interval with the claim's minimum effect ``m``, stated in
advance (``compare.experiments.claims``):

* ``holds``: the whole interval is at or above ``m``;
* ``negligible``: the whole interval lies inside ``(-m, m)``: whatever the effect is, it
  is smaller than the claim needs (this includes an interval that crosses zero: an
  equivalence test, two one-sided tests at ``+-m``);
* ``does not hold``: the whole interval is below zero, the opposite of the claim, and
  not inside ``(-m, m)``;
* ``inconclusive``: anything else (the interval reaches both past ``m`` or ``-m`` and
  across zero, or straddles ``m``): more seeds are needed.

A claim the lesson states as an absence ("Dropout does not improve stability",
"BatchNorm is not active at inference") measures the effect it says is absent; it holds
when that effect is ``negligible`` or ``does not hold``, and does not hold when the
effect ``holds``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

VERDICTS = ("holds", "does not hold", "negligible", "inconclusive")

# t(0.975, df) for df = 1..30; beyond, the normal quantile is within 2% of it.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.960


def t_quantile(df: int) -> float:
    """The two-sided 95% Student-t quantile for ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"an interval needs at least two seeds (df >= 1), got df = {df}")
    return _T975[df - 1] if df <= len(_T975) else _Z975


@dataclasses.dataclass(frozen=True)
class Interval:
    effect: float  # mean of the per-seed effects
    low: float
    high: float
    n: int


def interval(per_seed: list[float] | np.ndarray) -> Interval:
    """The 95% t-interval of the mean of per-seed (paired) effects; NaN values are an error:
    a seed that could not be measured is a failed experiment, not a missing value."""
    x = np.asarray(per_seed, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"an interval needs one effect per seed and at least two seeds, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"per-seed effects must be finite, got {x.tolist()}")
    mean = float(x.mean())
    half = t_quantile(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x))


def effect_verdict(ci: Interval, min_effect: float) -> str:
    """The verdict on "the effect is at least ``min_effect``" (see the module docstring)."""
    if min_effect <= 0:
        raise ValueError(f"min_effect must be positive, got {min_effect}")
    if ci.low >= min_effect:
        return "holds"
    if -min_effect < ci.low and ci.high < min_effect:
        return "negligible"
    if ci.high < 0:
        return "does not hold"
    return "inconclusive"


def verdict(ci: Interval, min_effect: float, *, absence: bool = False) -> str:
    """The verdict on the lesson's statement: the effect's verdict, or for a claimed
    absence, its mirror (an absent effect holds when the effect is negligible or
    opposite, and does not hold when the effect holds)."""
    v = effect_verdict(ci, min_effect)
    if not absence:
        return v
    return {"holds": "does not hold", "negligible": "holds", "does not hold": "holds"}.get(v, "inconclusive")
