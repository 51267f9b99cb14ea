"""Calibrated seed-level inference for the report's verdicts.

With a handful of seeds a percentile bootstrap only spans the seeds' range, and "the interval
includes zero" rewards having little data. These rules are paired t-tests (exact sign-flip
permutation tests from 6 seeds on), Holm-corrected within a claim, and TOST for equivalence.
Every rule has a vectorised form over a (rows, n) array of differences: the per-comparison
functions call it with one row, and the calibration tests simulate it with thousands.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import optimize, special, stats

from diffbench.analysis.verdicts import Verdict

Direction = Literal["negative", "positive"]

#: From this many seeds (64 flips) the sign-flip test has several outcomes below p = 0.05.
PERMUTATION_MIN_N = 6
#: From this many seeds a percentile bootstrap is worth showing next to the t-interval.
BOOTSTRAP_MIN_N = 10
BOOTSTRAP_RESAMPLES = 10_000
#: Up to this many seeds every sign flip is enumerated; beyond it 2^16 random flips bound the memory.
EXACT_FLIP_MAX_N = 16
#: Paired differences whose sd is below this fraction of their mean size have "no spread".
NO_SPREAD = 1e-6
#: Rows per block when enumerating flips, so that rows × patterns stays around 4 million floats.
_FLIP_BLOCK = 1 << 22


def paired_differences(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """a − b for every seed present in both: same seed means same split and evaluation noise."""
    return {seed: a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())}


def _rows(diffs: np.ndarray) -> np.ndarray:
    return np.atleast_2d(np.asarray(diffs, dtype=np.float64))


def t_intervals(diffs: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided paired t-interval of the mean per row of a (rows, n ≥ 2) array."""
    d = _rows(diffs)
    n = d.shape[1]
    half = special.stdtrit(n - 1, 0.5 + level / 2) * d.std(axis=1, ddof=1) / np.sqrt(n)
    mean = d.mean(axis=1)
    return mean - half, mean + half


def t_pvalues(diffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-sided paired t-test p-values (for Δ < 0, for Δ > 0) per row of a (rows, n ≥ 2) array.
    A row with zero spread has t = ±∞ (or 0 when its mean is 0 too) rather than NaN."""
    d = _rows(diffs)
    n = d.shape[1]
    mean = d.mean(axis=1)
    se = d.std(axis=1, ddof=1) / np.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, mean / se, np.sign(mean) * np.inf)
    t = np.where(np.isnan(t), 0.0, t)
    return special.stdtr(n - 1, t), special.stdtr(n - 1, -t)


def sign_patterns(n: int) -> np.ndarray:
    """All 2^n sign flips (the identity first), or the identity and 2^16 − 1 random ones for large n."""
    if n <= EXACT_FLIP_MAX_N:
        return np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    random = np.random.default_rng(0).choice((1.0, -1.0), size=((1 << EXACT_FLIP_MAX_N) - 1, n))
    return np.vstack([np.ones((1, n)), random])


def sign_flip_pvalues(diffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact one-sided sign-flip permutation p-values (for Δ < 0, for Δ > 0) of the mean per row:
    the fraction of flips whose mean is ≤ (resp. ≥) the observed one, the observed one included."""
    d = _rows(diffs)
    rows, n = d.shape
    patterns = sign_patterns(n)
    p_less, p_greater = np.empty(rows), np.empty(rows)
    block = max(1, _FLIP_BLOCK // len(patterns))
    for start in range(0, rows, block):
        chunk = d[start : start + block]
        means = chunk @ patterns.T / n
        observed = means[:, :1]
        # Flips that tie in exact arithmetic may differ in the last bits: count them as ties.
        tol = 1e-10 * np.abs(chunk).mean(axis=1, keepdims=True)
        p_less[start : start + block] = (means <= observed + tol).mean(axis=1)
        p_greater[start : start + block] = (means >= observed - tol).mean(axis=1)
    return p_less, p_greater


def no_spread(diffs: np.ndarray) -> np.ndarray:
    """Rows whose differences agree to within NO_SPREAD of their size: values equal up to rounding,
    where a t statistic would divide by (almost) zero and read agreement as certainty."""
    d = _rows(diffs)
    if d.shape[1] < 2:
        return np.zeros(len(d), dtype=bool)
    return d.std(axis=1, ddof=1) <= NO_SPREAD * np.abs(d).mean(axis=1)


def decided_by_sign_flip(diffs: np.ndarray, permutation_from: int = PERMUTATION_MIN_N) -> np.ndarray:
    """Rows whose verdict takes the exact sign-flip p: from `permutation_from` seeds on (6: no
    normality assumption, and below it at most 32 flips, too coarse to detect much), and wherever
    the differences have no spread (a t statistic would divide by zero)."""
    d = _rows(diffs)
    return np.full(len(d), d.shape[1] >= max(1, permutation_from)) | no_spread(d)


def directional_pvalues(
    diffs: np.ndarray, permutation_from: int = PERMUTATION_MIN_N
) -> tuple[np.ndarray, np.ndarray]:
    """The p-values (for Δ < 0, for Δ > 0) the verdicts use: the exact sign-flip test where
    `decided_by_sign_flip` says so, the one-sided paired t-test otherwise."""
    d = _rows(diffs)
    flips = decided_by_sign_flip(d, permutation_from)
    if flips.all():
        return sign_flip_pvalues(d)
    less, greater = t_pvalues(d)
    if flips.any():
        less[flips], greater[flips] = sign_flip_pvalues(d[flips])
    return less, greater


def holm_rejections(pvalues: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Holm step-down rejections along the last axis: controls the family-wise error of a claim's
    parts at alpha without assuming they are independent."""
    p = np.asarray(pvalues, dtype=np.float64)
    k = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1)
    passes = ranked <= alpha / (k - np.arange(k))
    rejected = np.empty(p.shape, dtype=bool)
    np.put_along_axis(rejected, order, np.logical_and.accumulate(passes, axis=-1), axis=-1)
    return rejected


def holm(pvalues: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm step-down rejections, in the input order."""
    if not pvalues:
        return []
    return [bool(r) for r in holm_rejections(np.asarray(pvalues), alpha)]


def claim_decisions(
    p_expected: np.ndarray, p_opposite: np.ndarray, alpha: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (rows, parts) p-values: the claim verdict per row, and per part whether its Holm-corrected
    test supports the expected direction and whether it rejects towards the opposite one."""
    supports = holm_rejections(p_expected, alpha)
    contradicts = holm_rejections(p_opposite, alpha)
    holds = supports.all(axis=-1) & (supports.shape[-1] > 0)
    verdict = np.where(
        contradicts.any(axis=-1), Verdict.CONTRADICTED, np.where(holds, Verdict.HOLDS, Verdict.NOT_SHOWN)
    )
    return verdict, supports, contradicts


def tost_pvalues(diffs: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a (rows, n ≥ 2) array: the p-value that |Δ| < margin (the larger of the two
    one-sided tests: below alpha exactly when the (1 − 2·alpha) interval lies inside ±margin) and the
    p-value that |Δ| > margin (twice the smaller one-sided test: below alpha exactly when the
    (1 − alpha) interval lies wholly outside, alpha/2 per side). Each is one call at the stated
    level; the tests are those of the directional rules on the shifted differences."""
    d = _rows(diffs)
    below_upper, above_upper = directional_pvalues(d - margin)
    below_lower, above_lower = directional_pvalues(d + margin)
    equivalent = np.maximum(below_upper, above_lower)
    different = np.minimum(1.0, 2 * np.minimum(above_upper, below_lower))
    return equivalent, different


def tost_decisions(p_equivalent: np.ndarray, p_different: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """Per part of (rows, parts) TOST p-values: equivalent or different after Holm across the parts
    of one test (each direction its own family), else undetermined."""
    equivalent = holm_rejections(p_equivalent, alpha)
    different = holm_rejections(p_different, alpha)
    return np.where(
        equivalent, Verdict.EQUIVALENT, np.where(different, Verdict.DIFFERENT, Verdict.UNDETERMINED)
    )


def tost_verdicts(diffs: np.ndarray, margin: float, alpha: float = 0.05) -> np.ndarray:
    """The TOST verdict of a single pair per row of a (rows, n ≥ 2) array."""
    equivalent, different = tost_pvalues(diffs, margin)
    return tost_decisions(equivalent[:, None], different[:, None], alpha)[:, 0]


def combined_equivalence(verdicts: list[Verdict]) -> Verdict:
    """A test over several pairs: equivalent when every pair is, different when any pair is."""
    if verdicts and all(v == Verdict.EQUIVALENT for v in verdicts):
        return Verdict.EQUIVALENT
    return Verdict.DIFFERENT if Verdict.DIFFERENT in verdicts else Verdict.UNDETERMINED


@functools.cache
def mde_multiplier(n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The noncentrality that a one-sided paired t-test at this n detects with the given power,
    divided by √n: the MDE in units of the paired sd."""
    df = n - 1
    critical = stats.t.ppf(1 - alpha, df)

    def shortfall(noncentrality: float) -> float:
        return float(stats.nct.sf(critical, df, noncentrality)) - power

    upper = 1.0
    while shortfall(upper) < 0:
        upper *= 2
    return float(optimize.brentq(shortfall, 0.0, upper, xtol=1e-10) / np.sqrt(n))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """Smallest true Δ that a one-sided paired t-test at this n detects with the given power if the
    seeds' sd is `sd`: tells "no effect" apart from "too few seeds to see one"."""
    return None if n < 2 else mde_multiplier(n, alpha, power) * sd


CLAIM_POWER_DRAWS = 4000
"""Simulated replicates behind a claim-level detectable effect (its Monte-Carlo error is about
±0.02 sd at 80% power)."""


@functools.cache
def claim_mde_multiplier(n: int, parts: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The effect, in paired-sd units on every part, at which a claim of `parts` directional tests
    holds (every part after Holm, with the verdicts' own p-values) with the given power at n seeds,
    for Gaussian differences. Found by bisection on common random numbers, along which the
    probability of "holds" can only grow with the effect."""
    noise = np.random.default_rng(n * 1000 + parts).standard_normal((CLAIM_POWER_DRAWS * parts, n))

    def power_at(effect: float) -> float:
        less, greater = directional_pvalues(noise - effect)
        shape = (CLAIM_POWER_DRAWS, parts)
        verdict = claim_decisions(less.reshape(shape), greater.reshape(shape), alpha)[0]
        return float(np.mean(verdict == Verdict.HOLDS))

    low, high = 0.0, 1.0
    while power_at(high) < power:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    while high - low > 0.01:
        middle = (low + high) / 2
        low, high = (middle, high) if power_at(middle) < power else (low, middle)
    return high


def bootstrap_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Seeded percentile bootstrap of the mean: a secondary view, only sound with enough seeds."""
    indices = np.random.default_rng(0).integers(0, len(values), size=(BOOTSTRAP_RESAMPLES, len(values)))
    low, high = np.quantile(values[indices].mean(axis=1), [0.5 - level / 2, 0.5 + level / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """Seed-paired difference a − b of one metric with everything the verdicts and the report read.
    Fields that need more seeds than there are (sd and tests: 2, permutation: 6, bootstrap: 10) are None."""

    label: str
    metric: str
    differences: dict[int, float]
    n: int
    alpha: float
    mean: float | None
    relative: float | None
    sd: float | None
    interval: tuple[float, float] | None
    p_less: float | None
    p_greater: float | None
    perm_p_less: float | None
    perm_p_greater: float | None
    bootstrap: tuple[float, float] | None
    mde: float | None
    no_spread: bool = False

    def p_value(self, direction: Direction) -> float | None:
        """p-value for Δ in `direction`: the permutation test's when it exists (from 6 seeds, or
        where the differences have no spread), else the t-test's."""
        if direction == "negative":
            return self.perm_p_less if self.perm_p_less is not None else self.p_less
        return self.perm_p_greater if self.perm_p_greater is not None else self.p_greater


def compare(
    label: str,
    metric: str,
    a: dict[int, float],
    b: dict[int, float],
    alpha: float = 0.05,
    permutation_from: int = PERMUTATION_MIN_N,
) -> Comparison:
    """Compare a against b over their common seeds. `permutation_from=1` makes the exact sign-flip
    test decide at any n: for a statistic with a few discrete values (Kendall's τ of three arms)
    the seeds can agree exactly, and a t-test would read zero spread as infinite evidence; that
    happens at any n for differences without spread."""
    differences = paired_differences(a, b)
    d = np.array(list(differences.values()), dtype=np.float64)
    n = len(d)
    mean = float(d.mean()) if n else None
    scale = float(np.mean([abs(b[seed]) for seed in differences])) if n else 0.0
    relative = mean / scale if mean is not None and scale != 0 else None
    sd = interval = p_less = p_greater = perm_less = perm_greater = boot = None
    flat = bool(no_spread(d)[0]) if n >= 2 else False
    if n >= 2:
        sd = float(d.std(ddof=1))
        low, high = t_intervals(d, 1 - alpha)
        interval = (float(low[0]), float(high[0]))
        less, greater = t_pvalues(d)
        p_less, p_greater = float(less[0]), float(greater[0])
    if n and decided_by_sign_flip(d, permutation_from)[0]:
        less, greater = sign_flip_pvalues(d)
        perm_less, perm_greater = float(less[0]), float(greater[0])
    if n >= BOOTSTRAP_MIN_N:
        boot = bootstrap_interval(d, 1 - alpha)
    mde = minimum_detectable_effect(sd, n, alpha) if sd is not None else None
    return Comparison(
        label=label,
        metric=metric,
        differences=differences,
        n=n,
        alpha=alpha,
        mean=mean,
        relative=relative,
        sd=sd,
        interval=interval,
        p_less=p_less,
        p_greater=p_greater,
        perm_p_less=perm_less,
        perm_p_greater=perm_greater,
        bootstrap=boot,
        mde=mde,
        no_spread=flat,
    )


@dataclass(frozen=True)
class PartVerdict:
    """One comparison within a claim: its p-values and what its Holm-corrected tests decided."""

    comparison: Comparison
    p: float
    p_opposite: float
    supports: bool
    contradicts: bool
    verdict: Verdict


@dataclass(frozen=True)
class ClaimVerdict:
    verdict: Verdict
    parts: tuple[PartVerdict, ...]


def opposite(direction: Direction) -> Direction:
    return "positive" if direction == "negative" else "negative"


def directional_claim(
    comparisons: list[Comparison], expect: Direction | list[Direction], alpha: float = 0.05
) -> ClaimVerdict:
    """A claim that each part's Δ goes its expected way (one direction for all, or one per part):
    holds only if every part's Holm-corrected test rejects towards its expectation, contradicted if
    any part's (separately Holm-corrected) test rejects the other way. A part with n < 2 enters with
    p = 1: the claim cannot hold, though the other parts may still contradict it."""
    directions = expect if isinstance(expect, list) else [expect] * len(comparisons)

    def p_or_one(c: Comparison, direction: Direction) -> float:
        p = c.p_value(direction)
        return 1.0 if p is None else p

    p_expected = np.array([[p_or_one(c, d) for c, d in zip(comparisons, directions, strict=True)]])
    p_opposite = np.array([[p_or_one(c, opposite(d)) for c, d in zip(comparisons, directions)]])
    verdict, supports, contradicts = claim_decisions(p_expected, p_opposite, alpha)
    parts = tuple(
        PartVerdict(
            c,
            float(p_expected[0, i]),
            float(p_opposite[0, i]),
            bool(supports[0, i]),
            bool(contradicts[0, i]),
            Verdict.CONTRADICTED
            if contradicts[0, i]
            else Verdict.HOLDS
            if supports[0, i]
            else Verdict.NOT_SHOWN,
        )
        for i, c in enumerate(comparisons)
    )
    return ClaimVerdict(Verdict(str(verdict[0])), parts)


def equivalence_test(comparisons: list[Comparison], margin: float, alpha: float = 0.05) -> list[Verdict]:
    """TOST per pair, Holm across the pairs; a pair with fewer than two seeds is undetermined."""
    usable = [i for i, c in enumerate(comparisons) if c.n >= 2]
    verdicts = [Verdict.UNDETERMINED] * len(comparisons)
    if not usable:
        return verdicts
    p = [tost_pvalues(np.array(list(comparisons[i].differences.values())), margin) for i in usable]
    decided = tost_decisions(
        np.array([[float(eq[0]) for eq, _ in p]]), np.array([[float(diff[0]) for _, diff in p]]), alpha
    )[0]
    for index, verdict in zip(usable, decided):
        verdicts[index] = Verdict(str(verdict))
    return verdicts
