"""Intervals, verdicts and seed counts for the lesson's claims.

Every claim is measured as one number per seed, the *effect*, signed so that a positive
value is what the lesson claims (fewer steps with BatchNorm, a smaller generalisation gap
with Dropout, ...). The seeds are paired: both arms of a seed start from the same
weights and see the same batches, so the per-seed difference removes most of the
seed-to-seed noise.

The interval is a Student-t interval of the mean effect at confidence ``level`` (95% for
one claim alone; ``1 - 0.05 / k`` for each of ``k`` claims judged together, Bonferroni's
correction, so that the chance that any of the ``k`` intervals misses its true value is at
most 5%). Quantiles are scipy's, exact at every degree of freedom. When the seeds come
from several *blocks* (torch and linen, on disjoint seeds), the estimate is the mean of the
block means, and its standard error uses the variance pooled within blocks
(``df = seeds - blocks``): a difference between the frameworks is a block effect, not noise
(:func:`blocked_interval`).

The verdict compares the interval with the claim's minimum effect ``m``, stated in
advance:

* ``holds``: the whole interval is at or above ``m``;
* ``negligible``: the whole interval lies inside ``(-m, m)``: whatever the effect is, it
  is smaller than the claim needs (this includes an interval that crosses zero: an
  equivalence test, two one-sided tests at ``+-m``);
* ``does not hold``: the whole interval is below zero, the opposite of the claim, and
  not inside ``(-m, m)``;
* ``inconclusive``: anything else (the interval reaches both past ``m`` or ``-m`` and
  across zero, or straddles ``m``): more seeds are needed.

A claim the lesson states as an absence ("Dropout does not improve stability") measures
the effect it says is absent; it holds when that effect is ``negligible`` or ``does not
hold``, and does not hold when the effect ``holds``.

:func:`seeds_for_power` gives the seeds a claim needs, from a pilot's spread: for a claim
of an effect, enough that an interval at ``level`` excludes zero with probability
``power`` when the true effect equals ``m``; for a claimed absence, enough that it lies
inside ``(-m, m)`` with probability ``power`` when the true effect is zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps

VERDICTS = ("holds", "does not hold", "negligible", "inconclusive")
FAMILY_ALPHA = 0.05  # the family-wise error rate of a confirmatory run


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile for ``df`` degrees of freedom: ``t(1 - (1 - level) / 2, df)``."""
    if df < 1:
        raise ValueError(f"an interval needs at least one degree of freedom, got df = {df}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(sps.t.ppf(1.0 - (1.0 - level) / 2.0, df))


def bonferroni_level(k: int, alpha: float = FAMILY_ALPHA) -> float:
    """Each of ``k`` intervals at ``1 - alpha / k``: all ``k`` cover together with probability >= ``1 - alpha``."""
    if k < 1:
        raise ValueError(f"a family has at least one claim, got k = {k}")
    return 1.0 - alpha / k


@dataclasses.dataclass(frozen=True)
class Interval:
    effect: float  # the estimate: mean of the per-seed effects (mean of the block means with blocks)
    low: float
    high: float
    n: int  # seeds
    level: float = 0.95
    df: int | None = None
    sd: float | None = None  # the per-seed standard deviation (pooled within blocks)


def _finite(values, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{what}: one effect per seed, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: per-seed effects must be finite, got {x.tolist()}")
    return x


def interval(per_seed: Sequence[float] | np.ndarray, level: float = 0.95) -> Interval:
    """The t-interval of the mean of per-seed (paired) effects; NaN values are an error:
    a seed that could not be measured is handled by the caller's stated rule, never
    silently dropped here."""
    x = _finite(per_seed, "interval")
    if len(x) < 2:
        raise ValueError(f"an interval needs one effect per seed and at least two seeds, got shape {x.shape}")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(len(x) - 1, level) * sd / math.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x), level, len(x) - 1, sd)


def blocked_interval(blocks: Mapping[str, Sequence[float]], level: float = 0.95) -> Interval:
    """The t-interval of the mean of the block means (each block weighs the same), with the
    within-block variance pooled: ``se = s_p * sqrt(sum(1 / n_b)) / B``, ``df = N - B``. One
    block is the plain one-sample interval."""
    xs = {b: _finite(v, f"block {b}") for b, v in blocks.items() if len(v)}
    if len(xs) == 1:
        return interval(next(iter(xs.values())), level)
    n, nb = sum(len(x) for x in xs.values()), len(xs)
    if nb == 0 or n - nb < 1:
        raise ValueError(f"a blocked interval needs more seeds than blocks, got {[len(x) for x in xs.values()]}")
    ss = sum(float(((x - x.mean()) ** 2).sum()) for x in xs.values())
    sd = math.sqrt(ss / (n - nb))
    mean = float(np.mean([x.mean() for x in xs.values()]))
    se = sd * math.sqrt(sum(1.0 / len(x) for x in xs.values())) / nb
    half = t_quantile(n - nb, level) * se
    return Interval(mean, mean - half, mean + half, n, level, n - nb, sd)


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


def power(n: int, sd: float, min_effect: float, level: float, *, blocks: int = 2, absence: bool = False) -> float:
    """The probability that ``n`` seeds (split evenly over ``blocks``) give the verdict the
    design aims at: an interval at ``level`` above zero when the true effect is
    ``min_effect`` (noncentral t); for a claimed absence, an interval inside
    ``(-min_effect, min_effect)`` when the true effect is zero (two one-sided tests)."""
    df = n - blocks
    if df < 1:
        return 0.0
    if sd <= 0:
        return 1.0
    se = sd / math.sqrt(n)  # equal allocation: sqrt(sum(1 / n_b)) / B = 1 / sqrt(n)
    t = t_quantile(df, level)
    if absence:
        return max(0.0, 2.0 * float(sps.t.cdf(min_effect / se - t, df)) - 1.0)
    return float(sps.nct.sf(t, df, min_effect / se))


def seeds_for_power(
    sd: float, min_effect: float, level: float, *, target: float = 0.8, blocks: int = 2, absence: bool = False,
    at_least: int = 4, at_most: int = 400,
) -> int:  # fmt: skip
    """The smallest seed count, a multiple of ``blocks`` and at least ``at_least``, whose
    :func:`power` reaches ``target``; ``at_most`` when none up to it does."""
    n = max(at_least, blocks + 1)
    n += (-n) % blocks
    while n < at_most and power(n, sd, min_effect, level, blocks=blocks, absence=absence) < target:
        n += blocks
    return min(n, at_most)


def sd_upper(sd: float, df: int, confidence: float = 0.8) -> float:
    """A one-sided upper confidence limit of a standard deviation estimated with ``df``
    degrees of freedom (chi-square): sizing from it instead of the pilot's own estimate
    keeps a small pilot's luck from under-powering the confirmation."""
    return sd * math.sqrt(df / float(sps.chi2.ppf(1.0 - confidence, df)))
