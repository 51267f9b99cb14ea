"""The four claims the suite tests, each turned into paired seed-level differences and a verdict."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffbench.analysis.collect import ARMS, HEADS, REFERENCE
from diffbench.analysis.stats import (
    HOLDS,
    Interval,
    bootstrap_interval,
    combine,
    directional_verdict,
    equivalence_verdict,
    paired_differences,
    spearman,
)
from diffbench.rundir import NLL_METRICS, QUALITY_METRICS, arm_label

Values = dict[str, dict[str, dict[int, float]]]
Curves = dict[str, dict[int, tuple[list[float], list[float]]]]


@dataclass
class Part:
    """One comparison behind a claim: what was differenced, its interval and its verdict."""

    label: str
    metric: str
    interval: Interval | None
    verdict: str


@dataclass
class Claim:
    number: int
    title: str
    expectation: str
    parts: list[Part]

    @property
    def verdict(self) -> str:
        return combine([part.verdict for part in self.parts])


def quality_metric(values: Values) -> str | None:
    """The sample-quality metric these runs have (fd_digits, fd_mnist or Inception FID)."""
    return next(iter(present_metrics(values, QUALITY_METRICS)), None)


def seeds_of(values: Values, arm: str, metric: str) -> dict[int, float]:
    return values.get(arm, {}).get(metric, {})


def interval_of(differences: dict[int, float]) -> Interval | None:
    return bootstrap_interval(list(differences.values())) if differences else None


def arm_interval(values: Values, arm: str, metric: str) -> Interval | None:
    return interval_of(seeds_of(values, arm, metric))


def paired_interval(values: Values, a: str, b: str, metric: str) -> Interval | None:
    """Interval of the seed-paired difference a − b."""
    return interval_of(paired_differences(seeds_of(values, a, metric), seeds_of(values, b, metric)))


def weighting_effects(values: Values, head: str, metric: str) -> dict[int, float]:
    """Per seed: the head's elbo arm minus its simple arm."""
    return paired_differences(
        seeds_of(values, arm_label(head, "elbo"), metric), seeds_of(values, arm_label(head, "own"), metric)
    )


def present_metrics(values: Values, candidates: tuple[str, ...]) -> list[str]:
    """The candidates some arm has: a metric nobody measured is not a comparison that failed."""
    present = {metric for metrics in values.values() for metric in metrics}
    return [m for m in candidates if m in present]


def weighting_wins(values: Values, winner: str, metrics: list[str]) -> list[Part]:
    """Per head and metric: does the `winner` weighting ("elbo" or "own") score lower?"""
    loser = "own" if winner == "elbo" else "elbo"
    parts = []
    for head in HEADS:
        for metric in metrics:
            a, b = arm_label(head, winner), arm_label(head, loser)
            diff = paired_interval(values, a, b, metric)
            label = f"{a} − {b}"
            parts.append(Part(label, metric, diff, directional_verdict(diff, "negative")))
    return parts


def claim_elbo_likelihood(values: Values) -> Claim:
    return Claim(
        1,
        "ELBO training gives better NLL than L_simple, for each head",
        "paired difference elbo − simple in bits/dim below zero",
        weighting_wins(values, "elbo", present_metrics(values, NLL_METRICS)),
    )


def claim_simple_quality(values: Values) -> Claim:
    return Claim(
        2,
        "L_simple gives better sample quality than ELBO training, for each head",
        "paired difference simple − elbo of the feature distance below zero",
        weighting_wins(values, "own", present_metrics(values, QUALITY_METRICS)[:1]),
    )


def claim_equivalence(values: Values) -> Claim:
    """On gmm the distance to the optimal ε* tests the equivalence most directly."""
    quality = quality_metric(values)
    metrics = present_metrics(values, (*NLL_METRICS, *([quality] if quality else []), "eps_star_mse"))
    pairs = [(a, b) for i, a in enumerate(HEADS) for b in HEADS[i + 1 :]]
    parts = []
    for metric in metrics:
        for a, b in pairs:
            arm_a, arm_b = arm_label(a, "elbo"), arm_label(b, "elbo")
            diff = paired_interval(values, arm_a, arm_b, metric)
            parts.append(Part(f"{arm_a} − {arm_b}", metric, diff, equivalence_verdict(diff)))
    for metric in metrics:
        for a, b in pairs:
            effects = paired_differences(
                weighting_effects(values, a, metric), weighting_effects(values, b, metric)
            )
            diff = interval_of(effects)
            label = f"(elbo − simple) of {a} − the same of {b}"
            parts.append(Part(label, metric, diff, equivalence_verdict(diff)))
    return Claim(
        3,
        "The three heads are equivalent under the ELBO, and the weighting has the same effect on every head",
        "every paired difference's interval includes zero",
        parts,
    )


def profile_correlations(curves: Curves, weights: dict[str, np.ndarray], arm: str) -> dict[int, float]:
    """Per seed, Spearman's ρ over t ≥ 2 between log(w_arm/w_ref) and log(err_arm/err_ref).
    `weights[arm]` is indexed by t − 2 (as `implied_eps_weight` returns it)."""
    correlations = {}
    for seed in sorted(curves.get(arm, {}).keys() & curves.get(REFERENCE, {}).keys()):
        t, error = (np.asarray(v) for v in curves[arm][seed])
        t_ref, error_ref = (np.asarray(v) for v in curves[REFERENCE][seed])
        if not np.array_equal(t, t_ref):
            continue
        keep = (t >= 2) & (t - 2 < min(len(weights[arm]), len(weights[REFERENCE])))
        index = t[keep].astype(int) - 2
        weight_ratio = np.log(weights[arm][index] / weights[REFERENCE][index])
        error_ratio = np.log(error[keep] / error_ref[keep])
        if keep.sum() >= 3 and np.ptp(weight_ratio) > 0:
            correlations[seed] = spearman(weight_ratio, error_ratio)
    return correlations


def claim_snr_weighting(curves: Curves, weights: dict[str, np.ndarray]) -> Claim:
    parts = []
    for arm in ARMS:
        if arm == REFERENCE or arm not in weights:
            continue
        diff = interval_of(profile_correlations(curves, weights, arm))
        label = f"{arm} vs {REFERENCE}: ρ(weight ratio, ε-error ratio) over t"
        parts.append(Part(label, "eps_mse_by_t", diff, directional_verdict(diff, "negative")))
    return Claim(
        4,
        "SNR weighting: where an arm's loss puts more ε-space weight than eps_simple's, its ε-error is lower",
        "rank correlation over t between the weight ratio and the measured ε-MSE ratio below zero",
        parts,
    )


def all_claims(values: Values, curves: Curves, weights: dict[str, np.ndarray]) -> list[Claim]:
    return [
        claim_elbo_likelihood(values),
        claim_simple_quality(values),
        claim_equivalence(values),
        claim_snr_weighting(curves, weights),
    ]


def summary_line(claim: Claim) -> str:
    held = sum(part.verdict == HOLDS for part in claim.parts)
    return f"Claim {claim.number}: {claim.verdict} ({held} of {len(claim.parts)} comparisons hold)"
