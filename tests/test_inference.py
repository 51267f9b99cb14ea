"""The report's statistical rules: checked against scipy and hand computations, and calibrated by
simulation (false-positive rates under no effect, power under a large one)."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from diffbench.analysis.inference import (
    claim_decisions,
    claim_mde_multiplier,
    compare,
    directional_claim,
    directional_pvalues,
    equivalence_test,
    holm,
    mde_multiplier,
    minimum_detectable_effect,
    no_spread,
    paired_differences,
    sign_flip_pvalues,
    t_pvalues,
    tost_decisions,
    tost_pvalues,
    tost_verdicts,
)
from diffbench.analysis.verdicts import Verdict

ALPHA = 0.05
SIMULATIONS = 10_000
#: Three binomial standard errors of a rate near α over SIMULATIONS draws (≈ 0.0065).
MC_SLACK = 3 * math.sqrt(ALPHA * (1 - ALPHA) / SIMULATIONS)


def seeds(values: list[float], start: int = 0) -> dict[int, float]:
    return {start + i: v for i, v in enumerate(values)}


def test_paired_differences_uses_common_seeds_only() -> None:
    assert paired_differences({0: 3.0, 1: 5.0, 4: 1.0}, {1: 2.0, 0: 1.0, 7: 9.0}) == {0: 2.0, 1: 3.0}


def test_t_interval_and_pvalues_match_scipy_and_hand_computation() -> None:
    a = {0: 1.0, 1: 2.5, 2: 2.0, 3: 4.0}
    b = {0: 1.5, 1: 2.0, 2: 3.0, 3: 4.8, 9: 7.0}  # seed 9 has no partner: left out
    c = compare("a − b", "nll", a, b)
    # d = [-0.5, 0.5, -1.0, -0.8]: mean -0.45, squared deviations sum to 1.33, sd = sqrt(1.33 / 3),
    # t = -0.45 / (sd / 2) = -1.35169 on 3 df, half-width t_{0.975,3} · sd / 2 = 3.18245 · 0.33292.
    assert c.n == 4
    assert c.mean == pytest.approx(-0.45)
    assert c.sd == pytest.approx(math.sqrt(1.33 / 3))
    assert c.relative == pytest.approx(-0.45 / ((1.5 + 2.0 + 3.0 + 4.8) / 4))
    assert c.interval == pytest.approx((-0.45 - 1.059489, -0.45 + 1.059489), abs=1e-6)
    assert c.p_less == pytest.approx(stats.t.cdf(-1.351691, 3), abs=1e-6)

    a_values, b_values = [a[s] for s in range(4)], [b[s] for s in range(4)]
    less = stats.ttest_rel(a_values, b_values, alternative="less")
    assert c.p_less == pytest.approx(less.pvalue)
    assert c.p_greater == pytest.approx(stats.ttest_rel(a_values, b_values, alternative="greater").pvalue)
    assert c.interval == pytest.approx(tuple(stats.ttest_rel(a_values, b_values).confidence_interval(0.95)))
    # Below 6 seeds there is no permutation test, below 10 no bootstrap; the verdicts use the t-test.
    assert c.perm_p_less is None and c.perm_p_greater is None and c.bootstrap is None
    assert c.p_value("negative") == c.p_less and c.p_value("positive") == c.p_greater


def test_vectorised_t_pvalues_match_scipy_per_row() -> None:
    d = np.random.default_rng(0).normal(0.3, 1.0, size=(50, 5))
    less, greater = t_pvalues(d)
    np.testing.assert_allclose(less, stats.ttest_1samp(d, 0.0, axis=1, alternative="less").pvalue)
    np.testing.assert_allclose(greater, stats.ttest_1samp(d, 0.0, axis=1, alternative="greater").pvalue)


def test_t_pvalues_without_spread_are_decisive_or_neutral_not_nan() -> None:
    less, greater = t_pvalues(np.array([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]))
    assert less.tolist() == [0.0, 0.5] and greater.tolist() == [1.0, 0.5]


def test_compare_fills_fields_by_number_of_seeds() -> None:
    rng = np.random.default_rng(1)
    empty = compare("x", "m", {}, {0: 1.0})
    one = compare("x", "m", {0: 2.0}, {0: 1.0})
    six = compare("x", "m", seeds(list(rng.normal(size=6))), seeds([0.0] * 6))
    twelve = compare("x", "m", seeds(list(rng.normal(size=12))), seeds([1.0] * 12))
    assert empty.n == 0 and empty.mean is None and empty.relative is None and empty.mde is None
    assert one.mean == 1.0 and one.relative == 1.0 and one.sd is None and one.p_value("negative") is None
    assert six.relative is None  # mean |b| is 0: no relative size
    assert six.perm_p_less is not None and six.bootstrap is None
    assert six.p_value("negative") == six.perm_p_less and six.p_value("positive") == six.perm_p_greater
    assert twelve.bootstrap is not None and twelve.perm_p_less is not None
    values = np.array(list(twelve.differences.values()))
    low, high = twelve.bootstrap
    assert values.min() < low < twelve.mean < high < values.max()
    assert compare("x", "m", seeds(list(values + 1.0)), seeds([1.0] * 12)).bootstrap == twelve.bootstrap


def brute_force_sign_flip(d: list[float]) -> tuple[float, float]:
    """Every sign flip in exact rational arithmetic, so ties are ties."""
    exact = [Fraction(x) for x in d]
    observed = sum(exact)
    sums = [sum(s * x for s, x in zip(signs, exact)) for signs in itertools.product((1, -1), repeat=len(d))]
    return (
        sum(s <= observed for s in sums) / len(sums),
        sum(s >= observed for s in sums) / len(sums),
    )


@pytest.mark.parametrize("n", [6, 7])
def test_sign_flip_pvalues_match_brute_force_enumeration(n: int) -> None:
    rng = np.random.default_rng(n)
    rows = [
        list(rng.normal(-0.5, 1.0, size=n)),
        list(rng.standard_t(3, size=n)),
        list(range(1, n + 1)),  # integers: many flips tie with each other and must count as ties
        [0.0, -2.0, 3.0, 0.0, 1.0, -1.0, 5.0][:n],  # zeros flip onto themselves
    ]
    less, greater = sign_flip_pvalues(np.array(rows))
    for row, p_less, p_greater in zip(rows, less, greater):
        assert (p_less, p_greater) == pytest.approx(brute_force_sign_flip(row), abs=1e-12)
    assert greater[2] == 1 / 2**n  # all positive: only the identity is as large


def test_sign_flip_beyond_exact_limit_samples_flips_and_agrees_with_t_test() -> None:
    d = np.random.default_rng(3).normal(0.4, 1.0, size=(1, 20))
    less, greater = sign_flip_pvalues(d)
    t_less, t_greater = t_pvalues(d)
    assert less[0] == pytest.approx(t_less[0], abs=0.02) and greater[0] == pytest.approx(
        t_greater[0], abs=0.02
    )


def test_holm_hand_worked() -> None:
    # Sorted: 0.005 ≤ 0.05/4 = 0.0125 rejected; 0.01 ≤ 0.05/3 = 0.0167 rejected;
    # 0.03 > 0.05/2 = 0.025 not rejected, and the step-down stops: 0.04 is not rejected either.
    assert holm([0.01, 0.04, 0.03, 0.005], ALPHA) == [True, False, False, True]
    # 0.01 ≤ 0.0167, 0.02 ≤ 0.025, 0.03 ≤ 0.05: all rejected (Bonferroni, 0.0167 each, takes only one).
    assert holm([0.03, 0.01, 0.02], ALPHA) == [True, True, True]
    # The smallest fails its threshold, so nothing is rejected even though 0.04 < 0.05.
    assert holm([0.04, 0.03], ALPHA) == [False, False]
    assert holm([], ALPHA) == []


def paired(values: list[float], start: int = 0) -> tuple[dict[int, float], dict[int, float]]:
    """Arms whose seed-paired differences are `values`."""
    return seeds([v + 10.0 for v in values], start), seeds([10.0] * len(values), start)


def test_directional_claim_holds_contradicts_or_is_not_shown() -> None:
    rng = np.random.default_rng(4)
    strong = [compare(f"h{i}", "nll", *paired(list(rng.normal(-3, 1, size=8)))) for i in range(3)]
    # At n = 8 each part's permutation p is 1/256, below every Holm threshold (0.0167, 0.025, 0.05).
    verdict = directional_claim(strong, "negative")
    assert verdict.verdict == Verdict.HOLDS
    assert [part.verdict for part in verdict.parts] == [Verdict.HOLDS] * 3
    assert all(part.p == 1 / 256 and part.supports for part in verdict.parts)

    null = compare("h3", "nll", *paired([0.3, -0.2, 0.1, -0.4, 0.25, -0.05, 0.2, -0.1]))
    verdict = directional_claim([*strong[:2], null], "negative")
    assert verdict.verdict == Verdict.NOT_SHOWN
    assert [part.verdict for part in verdict.parts] == [Verdict.HOLDS, Verdict.HOLDS, Verdict.NOT_SHOWN]

    reversed_ = compare("h3", "nll", *paired(list(rng.normal(3, 1, size=8))))
    verdict = directional_claim([*strong[:2], reversed_], "negative")
    assert verdict.verdict == Verdict.CONTRADICTED and verdict.parts[2].contradicts
    assert directional_claim(strong, "positive").verdict == Verdict.CONTRADICTED

    missing = compare("h3", "nll", {}, {0: 1.0})
    verdict = directional_claim([*strong[:2], missing], "negative")
    assert verdict.verdict == Verdict.NOT_SHOWN and verdict.parts[2].p == 1.0
    assert directional_claim([], "negative").verdict == Verdict.NOT_SHOWN


def test_directional_claim_uses_t_test_below_six_seeds() -> None:
    c = compare("h", "nll", *paired([-1.0, -1.2, -0.9, -1.1, -1.05]))
    part = directional_claim([c], "negative").parts[0]
    assert part.p == c.p_less and part.p_opposite == c.p_greater and part.verdict == Verdict.HOLDS


def centred_at(mean: float, level: float, n: int = 3) -> dict[int, float]:
    """Differences mean + s·(−1, 0, 1) with s chosen so that the `level` t-interval is mean ± 1."""
    s = math.sqrt(n) / stats.t.ppf(0.5 + level / 2, n - 1)
    return seeds([mean - s, mean, mean + s])


def tost(differences: dict[int, float], margin: float) -> str:
    return equivalence_test([compare("x", "m", differences, dict.fromkeys(differences, 0.0))], margin)[0]


@pytest.mark.parametrize(
    ("mean", "level", "expected"),
    [
        (0.49, 0.90, Verdict.EQUIVALENT),  # 90% interval (−0.51, 1.49) just inside (−1.5, 1.5)
        (-0.49, 0.90, Verdict.EQUIVALENT),
        (0.51, 0.90, Verdict.UNDETERMINED),  # (−0.49, 1.51) straddles +1.5
        (2.51, 0.90, Verdict.UNDETERMINED),  # 90% interval (1.51, 3.51) is outside, but the 95% one is wider
        (2.49, 0.95, Verdict.UNDETERMINED),  # 95% interval (1.49, 3.49) straddles +1.5
        (2.51, 0.95, Verdict.DIFFERENT),  # 95% interval (1.51, 3.51) entirely above +1.5
        (-2.51, 0.95, Verdict.DIFFERENT),  # entirely below −1.5
    ],
)
def test_tost_calls_each_side_a_five_percent_test(mean: float, level: float, expected: str) -> None:
    """Equivalent when the 90% interval lies inside ±δ (two 5% tests), different only when the 95%
    interval lies wholly outside (2.5% per side): each call is a 5% test."""
    assert tost(centred_at(mean, level), margin=1.5) == expected


def test_tost_needs_two_seeds_and_holm_across_pairs() -> None:
    assert tost({0: 0.0}, margin=1.5) == Verdict.UNDETERMINED
    # Alone, a pair at the edge of "different" is called different; beside two undetermined pairs
    # Holm asks p ≤ 0.05/3 of the smallest and the same pair is no longer called.
    edge = compare("x", "m", centred_at(2.6, 0.95), seeds([0.0] * 3))
    vague = compare("y", "m", seeds([-3.0, 0.0, 3.0]), seeds([0.0] * 3))
    assert equivalence_test([edge], 1.5) == [Verdict.DIFFERENT]
    assert equivalence_test([edge, vague, vague], 1.5) == [Verdict.UNDETERMINED] * 3


def draw(rng: np.random.Generator, distribution: str, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance noise: Gaussian, or Student t with 3 df (heavy tails) scaled to sd 1."""
    if distribution == "gaussian":
        return rng.standard_normal(shape)
    return rng.standard_t(3, shape) / math.sqrt(3)


def single_verdicts(diffs: np.ndarray) -> np.ndarray:
    """The verdict of a one-part claim "Δ < 0" per row, through the same rules the report uses."""
    less, greater = directional_pvalues(diffs)
    return claim_decisions(less[:, None], greater[:, None], ALPHA)[0]


@pytest.mark.parametrize("distribution", ["gaussian", "t3"])
@pytest.mark.parametrize("n", [3, 5, 8])
def test_verdicts_are_calibrated_under_no_effect(distribution: str, n: int) -> None:
    rng = np.random.default_rng(100 * n + len(distribution))
    single = single_verdicts(draw(rng, distribution, (SIMULATIONS, n)))
    assert np.mean(single == Verdict.HOLDS) <= ALPHA + MC_SLACK
    assert np.mean(single == Verdict.CONTRADICTED) <= ALPHA + MC_SLACK
    if distribution == "gaussian":  # exact tests under normality: the rate is near α, not vacuously 0
        assert np.mean(single == Verdict.HOLDS) >= ALPHA - MC_SLACK - 0.005

    less, greater = directional_pvalues(draw(rng, distribution, (3 * SIMULATIONS, n)))
    claim = claim_decisions(less.reshape(SIMULATIONS, 3), greater.reshape(SIMULATIONS, 3), ALPHA)[0]
    assert np.mean(claim == Verdict.HOLDS) <= ALPHA + MC_SLACK
    assert np.mean(claim == Verdict.CONTRADICTED) <= ALPHA + MC_SLACK

    # Exactly equivalent pair: TOST rarely calls it different. At Δ = margin (the edge of equivalence)
    # it calls it equivalent at most at α: equivalence is what TOST has to earn.
    margin = 1.0
    assert np.mean(tost_verdicts(draw(rng, distribution, (SIMULATIONS, n)), margin) == Verdict.DIFFERENT) <= (
        ALPHA + MC_SLACK
    )
    at_edge = tost_verdicts(margin + draw(rng, distribution, (SIMULATIONS, n)), margin)
    assert np.mean(at_edge == Verdict.EQUIVALENT) <= ALPHA + MC_SLACK
    # Three exactly equivalent pairs of one test: "any pair different" stays within α after Holm
    # (a margin of 0.3 sd makes single calls frequent enough for the correction to matter).
    equivalent, different = tost_pvalues(draw(rng, distribution, (3 * SIMULATIONS, n)), 0.3)
    calls = tost_decisions(equivalent.reshape(SIMULATIONS, 3), different.reshape(SIMULATIONS, 3))
    assert np.mean((calls == Verdict.DIFFERENT).any(axis=1)) <= ALPHA + MC_SLACK


def test_permutation_path_from_six_seeds() -> None:
    d = np.random.default_rng(5).standard_normal((200, 8))
    less, _ = directional_pvalues(d)
    np.testing.assert_array_equal(less, sign_flip_pvalues(d)[0])
    np.testing.assert_allclose(less * 256, np.round(less * 256))  # multiples of 1/2^8


@pytest.mark.parametrize(("n", "minimum_power"), [(3, 0.6), (5, 0.9), (8, 0.95)])
def test_power_against_an_effect_of_two_sd(n: int, minimum_power: float) -> None:
    rng = np.random.default_rng(n)
    single = single_verdicts(draw(rng, "gaussian", (SIMULATIONS, n)) - 2.0)
    # Observed while writing: 0.71 at n = 3, 0.975 at n = 5, 1.000 at n = 8.
    assert np.mean(single == Verdict.HOLDS) > minimum_power
    assert np.mean(single == Verdict.CONTRADICTED) == 0.0


def test_minimum_detectable_effect_has_80_percent_power() -> None:
    n, sd = 5, 1.7
    delta = minimum_detectable_effect(sd, n)
    assert delta is not None
    d = np.random.default_rng(6).normal(delta, sd, size=(SIMULATIONS, n))
    power = np.mean(t_pvalues(d)[1] <= ALPHA)
    assert power == pytest.approx(0.8, abs=3 * math.sqrt(0.8 * 0.2 / SIMULATIONS))


def test_minimum_detectable_effect_shrinks_with_n_and_scales_with_sd() -> None:
    effects = [minimum_detectable_effect(1.0, n) for n in (2, 3, 5, 8, 10, 20)]
    assert all(later < earlier for earlier, later in zip(effects, effects[1:]))
    assert minimum_detectable_effect(2.0, 5) == pytest.approx(2 * effects[2])
    assert minimum_detectable_effect(1.0, 1) is None
    c = compare("x", "m", *paired([0.1, -0.3, 0.4, 0.0, 0.2]))
    assert c.mde == pytest.approx(
        minimum_detectable_effect(float(np.std([0.1, -0.3, 0.4, 0.0, 0.2], ddof=1)), 5)
    )


@pytest.mark.parametrize(("n", "expected"), [(3, Verdict.NOT_SHOWN), (5, Verdict.HOLDS)])
def test_constant_differences_need_the_sign_flip_test_not_a_zero_spread_t_test(n: int, expected: str) -> None:
    """Seeds that agree exactly (a discrete statistic such as Kendall's τ of three arms) carry the
    evidence of n signs, p = 2^−n, not the infinite t of zero spread."""
    taus = dict.fromkeys(range(n), -0.8165)
    trend = compare("τ", "fd", taus, dict.fromkeys(taus, 0.0), permutation_from=1)
    assert trend.perm_p_less == pytest.approx(2.0**-n) and trend.perm_p_greater == 1.0
    assert directional_claim([trend], "negative").verdict == expected
    flat = compare("τ", "fd", taus, dict.fromkeys(taus, 0.0))
    assert flat.p_less < 1e-10, "what the t-test would say"
    # Differences without spread take the exact sign-flip p at any n, with or without the option.
    assert flat.no_spread and flat.p_value("negative") == pytest.approx(2.0**-n)
    assert directional_claim([flat], "negative").verdict == expected


def test_no_spread_is_relative_to_the_size_of_the_differences() -> None:
    rows = np.array([[5.0, 5.0, 5.0 + 1e-9], [1e-8, 2e-8, 3e-8], [10.0, 10.0001, 10.0002]])
    assert no_spread(rows).tolist() == [True, False, False]
    less, _ = directional_pvalues(-rows)
    assert less[0] == 1 / 8 and less[1] == pytest.approx(t_pvalues(-rows[1:2])[0][0])


@pytest.mark.parametrize(("n", "parts"), [(3, 1), (3, 3), (5, 2)])
def test_claim_level_detectable_effect_has_80_percent_power(n: int, parts: int) -> None:
    """At the multiplier, a claim of `parts` independent parts with that effect in paired-sd units
    holds (every part after Holm) 80% of the time, on noise independent of the search's."""
    effect = claim_mde_multiplier(n, parts)
    less, greater = directional_pvalues(
        np.random.default_rng(99).standard_normal((SIMULATIONS * parts, n)) - effect
    )
    shape = (SIMULATIONS, parts)
    power = np.mean(claim_decisions(less.reshape(shape), greater.reshape(shape))[0] == Verdict.HOLDS)
    assert power == pytest.approx(0.8, abs=0.02)
    if parts == 1:
        assert effect == pytest.approx(mde_multiplier(n), abs=0.05)
    else:
        assert effect > claim_mde_multiplier(n, 1)


def test_a_claim_the_sign_flip_test_cannot_pass_has_no_detectable_effect() -> None:
    """At n = 6 the smallest sign-flip p is 1/64 = 0.0156, above Holm's first threshold for four
    parts (0.05/4 = 0.0125): no effect makes such a claim hold."""
    assert claim_mde_multiplier(6, 4) == math.inf and math.isfinite(claim_mde_multiplier(6, 3))
