"""Seed-level statistics for the report: bootstrap intervals, paired differences, verdicts."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

#: Up to this many resamples the bootstrap is enumerated exactly (n = 6 seeds gives 46,656).
EXACT_LIMIT = 50_000


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap confidence interval over n seeds."""

    mean: float
    low: float
    high: float
    n: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def bootstrap_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Means of bootstrap resamples: every one of the n^n equally likely resamples when that is
    small (a handful of seeds, where Monte Carlo noise would move the interval), else random ones."""
    n = len(values)
    if n**n <= EXACT_LIMIT:
        indices = np.array(list(itertools.product(range(n), repeat=n)))
    else:
        indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return values[indices].mean(axis=1)


def bootstrap_interval(
    values: list[float], level: float = 0.95, resamples: int = 20_000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval of the mean (numpy's linear quantiles of the resampled means).
    With one value the interval collapses to the point: nothing can be said about its spread."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    means = bootstrap_means(array, resamples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(array.mean()), float(low), float(high), int(array.size))


def paired_differences(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """a − b for every seed present in both: same seed means same split and evaluation noise."""
    return {seed: a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())}


HOLDS, FAILS, INCONCLUSIVE, NO_DATA = "holds", "fails", "inconclusive", "no data"


def directional_verdict(diff: Interval | None, expect: str) -> str:
    """`expect` "negative" or "positive": holds when the interval excludes zero on that side,
    fails when it excludes zero on the other side, else inconclusive."""
    if diff is None or diff.n < 2:
        return NO_DATA
    if not diff.excludes_zero():
        return INCONCLUSIVE
    negative = diff.high < 0
    return HOLDS if negative == (expect == "negative") else FAILS


def equivalence_verdict(diff: Interval | None) -> str:
    """Equivalent when the paired difference's interval includes zero."""
    if diff is None or diff.n < 2:
        return NO_DATA
    return FAILS if diff.excludes_zero() else HOLDS


def combine(verdicts: list[str]) -> str:
    """A claim over several heads or pairs: fails if any part fails; holds only if every part
    holds (a part without data, e.g. a missing head, leaves the claim inconclusive)."""
    if not verdicts or all(v == NO_DATA for v in verdicts):
        return NO_DATA
    if FAILS in verdicts:
        return FAILS
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    return INCONCLUSIVE


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation (average ranks for ties): the weight–error relation need not be linear."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)
