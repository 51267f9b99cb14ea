"""The claims the suite tests, stated as the sources state them, each turned into seed-paired
comparisons and a calibrated verdict (`analysis.inference`).

1. Likelihood: on each head, the ELBO gives lower NLL than DDPM's L_simple (the `eps` weighting).
2. Samples: on each head, the `eps` weighting gives lower FD/KID than the ELBO.
3. Equivalence of heads, three ways: (a) the ELBOs are one function of ε̂ (checked on numbers),
   (b) the same optimum (on gmm: every head's distance to ε* shrinks with budget), (c) the same
   training dynamics at a budget (TOST between heads under one weighting).
4. The SNR argument within one head: weightings that move weight to low SNR give lower FD and
   higher NLL (a monotone trend across seeds); where in log SNR the NLL is lost.

A directional test says "holds" only when every head's one-sided test passes after Holm's
correction, "contradicted" when one passes the other way, else "not shown at this n".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from diffbench.analysis.inference import (
    CONTRADICTED,
    DIFFERENT,
    EQUIVALENT,
    HOLDS,
    NOT_SHOWN,
    UNDETERMINED,
    Comparison,
    Direction,
    compare,
    directional_claim,
    equivalence_test,
)
from diffbench.core.diffusion import NoiseSchedule, q_sample
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS, LossInputs
from diffbench.core.arms import Arm
from diffbench.rundir import NLL_METRICS, QUALITY_METRICS

Values = dict[str, dict[str, dict[int, float]]]
"""{arm: {metric: {seed: value}}}"""

IDENTITY = "identity"
PLUMBING = "plumbing check: no verdict"


@dataclass
class Test:
    """One family of comparisons with one rule: directional (Holm within the family) or TOST."""

    title: str
    metric: str
    kind: str
    comparisons: list[Comparison]
    verdict: str
    part_verdicts: list[str]
    expect: Direction | None = None
    margin: float | None = None
    primary: bool = True


@dataclass
class Claim:
    number: int
    title: str
    source: str
    tests: list[Test] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """The primary tests' verdicts: one word when they agree, else each named."""
        words = [t.verdict for t in self.tests if t.primary]
        if not words:
            return NOT_SHOWN
        return (
            words[0]
            if len(set(words)) == 1
            else "; ".join(f"{t.title}: {t.verdict}" for t in self.tests if t.primary)
        )


def arm_for(values: Values, head: str, weighting: str) -> str:
    """The arm of (head, weighting) in these runs. A head's own MSE and the weighting named after
    the head are one objective, so either arm stands for the other."""
    names = [Arm(head, weighting).label]
    if weighting == head:
        names.append(Arm(head, "own").label)
    if weighting == "own":
        names.append(Arm(head, head).label)
    return next((name for name in names if name in values), names[0])


def heads_in(values: Values) -> list[str]:
    """Heads with any arm in these runs, in registry order."""
    return [h for h in HEADS if any(arm_for(values, h, w) in values for w in WEIGHTINGS)]


def seeds_of(values: Values, arm: str, metric: str) -> dict[int, float]:
    return values.get(arm, {}).get(metric, {})


def comparison(values: Values, a: str, b: str, metric: str) -> Comparison:
    return compare(f"{a} − {b}", metric, seeds_of(values, a, metric), seeds_of(values, b, metric))


def directional_test(
    values: Values, title: str, metric: str, pairs: list[tuple[str, str]], expect: Direction, primary: bool
) -> Test:
    """Per pair a − b, one-sided in the expected direction, Holm-corrected within the test."""
    comparisons = [comparison(values, a, b, metric) for a, b in pairs]
    result = directional_claim(comparisons, expect)
    parts = [part.verdict for part in result.parts]
    return Test(title, metric, "directional", comparisons, result.verdict, parts, expect, primary=primary)


def weighting_test(
    values: Values, winner: str, loser: str, metric: str, primary: bool, heads: list[str]
) -> Test:
    pairs = [(arm_for(values, h, winner), arm_for(values, h, loser)) for h in heads]
    return directional_test(values, f"{winner} < {loser}", metric, pairs, "negative", primary)


def present(values: Values, metrics: tuple[str, ...]) -> list[str]:
    """The metrics some arm has: a metric nobody measured is not a comparison that failed."""
    found = {metric for metrics_ in values.values() for metric in metrics_}
    return [m for m in metrics if m in found]


def claim_likelihood(values: Values, nll: tuple[str, ...], heads: list[str]) -> Claim:
    claim = Claim(
        1,
        "ELBO training gives lower NLL than L_simple, on each head",
        "DDPM Table 2 (3.70 vs 3.75 bpd on CIFAR-10); improved DDPM's L_vlb",
    )
    for index, metric in enumerate(present(values, nll)):
        claim.tests.append(weighting_test(values, "elbo", "eps", metric, index == 0, heads))
        claim.tests.append(weighting_test(values, "elbo_is", "eps", metric, False, heads))
        claim.tests.append(weighting_test(values, "elbo", "own", metric, False, heads))
    claim.tests = [t for t in claim.tests if any(c.n for c in t.comparisons)]
    return claim


def claim_samples(values: Values, quality: tuple[str, ...], heads: list[str]) -> Claim:
    claim = Claim(
        2,
        "L_simple (the eps weighting) gives better samples than the ELBO, on each head",
        "DDPM Table 2 (FID 3.17 vs 13.51 on CIFAR-10)",
    )
    for index, metric in enumerate(present(values, quality)):
        claim.tests.append(weighting_test(values, "eps", "elbo", metric, index == 0, heads))
        claim.tests.append(weighting_test(values, "own", "elbo", metric, False, heads))
    claim.tests = [t for t in claim.tests if any(c.n for c in t.comparisons)]
    return claim


def elbo_identity(num_timesteps: int = 1000, seed: int = 0) -> float:
    """The largest relative difference between the heads' ELBO losses for one random ε̂ per
    example, each head's output converted from it: they are one function of ε̂."""
    generator = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule("linear", num_timesteps)
    t = torch.randint(1, num_timesteps + 1, (64,), generator=generator)
    x0 = torch.randint(0, 17, (64, 1, 8, 8), generator=generator).double() / 8 - 1
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    alpha_bar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    xt = q_sample(x0, eps, alpha_bar)
    eps_hat = eps + torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    outputs = {
        "eps": eps_hat,
        "x0": (xt - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt(),
        "score": -eps_hat / (1 - alpha_bar).sqrt(),
        "v": (eps_hat - (1 - alpha_bar).sqrt() * xt) / alpha_bar.sqrt(),
    }
    losses = []
    for name, head in HEADS.items():
        target = head.target(x0, eps, alpha_bar)
        inputs = LossInputs(x0, xt, t, outputs[name], target, num_timesteps, 17, "small")
        losses.append(WEIGHTINGS["elbo"].loss(head, schedule, inputs))
    stack = torch.stack(losses)
    return float(((stack - stack[0]).abs() / stack[0].abs()).max())


def claim_equivalence(
    values: Values, budgets: dict[int, Values], margins: dict[str, float], metrics: tuple[str, ...]
) -> Claim:
    claim = Claim(
        3,
        "The heads are equivalent",
        "the heads are affine in one another at every t (Ho et al.; Kingma et al.; Salimans & Ho)",
    )
    claim.facts.append(
        f"(a) same objective: the {len(HEADS)} heads' ELBO losses on random outputs differ by at most "
        f"{elbo_identity():.1e} (relative): one function of ε̂."
    )
    heads = heads_in(values)
    if budgets and any("eps_star_elbo_bpd" in m for v in budgets.values() for m in v.values()):
        for head in heads:
            claim.facts.append(
                f"(b) same optimum, {head}: {eps_star_trend(budgets, arm_for(values, head, 'elbo'))}"
            )
    for metric in present(values, metrics):
        margin = margins.get(metric)
        if margin is None:
            continue
        for weighting in ("elbo", "eps", "own"):
            arms = [arm_for(values, h, weighting) for h in heads if arm_for(values, h, weighting) in values]
            pairs = [(a, b) for i, a in enumerate(arms) for b in arms[i + 1 :]]
            if not pairs:
                continue
            comparisons = [comparison(values, a, b, metric) for a, b in pairs]
            verdicts = equivalence_test(comparisons, margin)
            combined = (
                EQUIVALENT
                if all(v == EQUIVALENT for v in verdicts)
                else DIFFERENT
                if any(v == DIFFERENT for v in verdicts)
                else UNDETERMINED
            )
            title = f"(c) same dynamics under {weighting}"
            claim.tests.append(
                Test(
                    title,
                    metric,
                    "equivalence",
                    comparisons,
                    combined,
                    verdicts,
                    margin=margin,
                    primary=False,
                )
            )
    return claim


def eps_star_trend(budgets: dict[int, Values], arm: str) -> str:
    """Slope of log(ELBO-weighted distance to ε*) against log(steps) per seed, with its
    t-interval: negative means the head is still approaching the optimum."""
    steps = sorted(budgets)
    per_seed: dict[int, list[tuple[int, float]]] = {}
    for step in steps:
        for seed, value in seeds_of(budgets[step], arm, "eps_star_elbo_bpd").items():
            per_seed.setdefault(seed, []).append((step, value))
    slopes = {
        seed: float(np.polyfit(np.log([s for s, _ in rows]), np.log([v for _, v in rows]), 1)[0])
        for seed, rows in per_seed.items()
        if len(rows) >= 2 and all(v > 0 for _, v in rows)
    }
    if not slopes:
        return "no per-budget distance to ε* recorded"
    last = seeds_of(budgets[steps[-1]], arm, "eps_star_elbo_bpd")
    trend = compare("slope", "log distance / log steps", slopes, dict.fromkeys(slopes, 0.0))
    interval = "" if trend.interval is None else f" [{trend.interval[0]:.3g}, {trend.interval[1]:.3g}]"
    final = np.mean(list(last.values())) if last else float("nan")
    return (
        f"{arm}: slope of log distance vs log steps {trend.mean:.3g}{interval} (n={trend.n}); "
        f"ELBO-weighted distance at {steps[-1]} steps {final:.4g} bpd"
    )


def low_snr_share(head: str, weighting: str, schedule: NoiseSchedule, variance: str) -> float:
    """The share of an arm's ε-space weight (uniform t) on steps with log SNR < 0."""
    t = torch.arange(1, schedule.num_timesteps + 1)
    weight = WEIGHTINGS[weighting].eps_weight(HEADS[head], schedule, t, variance)  # type: ignore[arg-type]
    low = torch.log(schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])) < 0
    return float(weight[low].sum() / weight.sum())


def claim_snr(values: Values, schedule: NoiseSchedule, variance: str, metrics: dict[str, Direction]) -> Claim:
    """Within each head with three or more weightings: Kendall's τ per seed between the low-SNR
    share and the metric, then an exact one-sided sign-flip test across seeds that τ has the
    expected sign (its smallest p is 2^−n: five seeds are needed to reach α = 0.05)."""
    claim = Claim(
        4,
        "Moving weight to low SNR buys sample quality and costs likelihood, within a head",
        "the SNR-weighting argument for L_simple (Ho et al. 2020; Kingma & Gao 2023)",
    )
    for head in heads_in(values):
        # elbo_is is the ELBO's weighting with another estimator (same w_ε), not a third weighting.
        arms = {
            w: arm_for(values, head, w)
            for w in WEIGHTINGS
            if w != "elbo_is" and (w != "own" or arm_for(values, head, w) in values)
        }
        arms = {w: a for w, a in arms.items() if a in values}
        if len(set(arms.values())) < 3:
            continue
        shares = {a: low_snr_share(head, w, schedule, variance) for w, a in arms.items()}
        order = sorted(set(arms.values()), key=shares.__getitem__)
        claim.facts.append(
            f"{head}: weightings by low-SNR share: " + ", ".join(f"{a} {shares[a]:.2f}" for a in order)
        )
        for metric, expect in metrics.items():
            seeds = set.intersection(*(set(seeds_of(values, a, metric)) for a in order))
            taus = {
                seed: float(
                    stats.kendalltau(
                        [shares[a] for a in order], [values[a][metric][seed] for a in order]
                    ).statistic
                )
                for seed in sorted(seeds)
            }
            trend = compare(
                f"τ(low-SNR share, {metric}) on {head}",
                metric,
                taus,
                dict.fromkeys(taus, 0.0),
                permutation_from=1,
            )
            result = directional_claim([trend], expect)
            claim.tests.append(
                Test(
                    f"{head}: τ {'<' if expect == 'negative' else '>'} 0",
                    metric,
                    "directional",
                    [trend],
                    result.verdict,
                    [result.parts[0].verdict],
                    expect,
                )
            )
    return claim


Curves = dict[str, dict[int, tuple[list[float], list[float]]]]


def weight_error_check(
    curves: Curves, weights: dict[str, np.ndarray], arm: str, reference: str
) -> str | None:
    """Does training do what its weights say? Spearman's ρ over t ≥ 2 between log(w_arm/w_ref)
    and log(ε-MSE_arm/ε-MSE_ref), per seed (expected negative: more weight, less error)."""
    rhos = []
    for seed in sorted(curves.get(arm, {}).keys() & curves.get(reference, {}).keys()):
        t, error = (np.asarray(v) for v in curves[arm][seed])
        t_ref, error_ref = (np.asarray(v) for v in curves[reference][seed])
        if not np.array_equal(t, t_ref):
            continue
        keep = (t >= 2) & (t - 2 < min(len(weights[arm]), len(weights[reference])))
        index = t[keep].astype(int) - 2
        weight_ratio = np.log(weights[arm][index] / weights[reference][index])
        if keep.sum() >= 3 and np.ptp(weight_ratio) > 0:
            rhos.append(float(stats.spearmanr(weight_ratio, np.log(error[keep] / error_ref[keep])).statistic))
    if not rhos:
        return None
    return f"{arm} vs {reference}: ρ(weight ratio, ε-error ratio) per seed " + ", ".join(
        f"{r:+.2f}" for r in rhos
    )


def all_claims(
    values: Values,
    budgets: dict[int, Values],
    schedule: NoiseSchedule,
    variance: str,
    margins: dict[str, float],
    curves: Curves,
    weights: dict[str, np.ndarray],
    reference: str,
    quality: tuple[str, ...] = QUALITY_METRICS,
) -> list[Claim]:
    """The four claims at the final budget; claim 4 carries the weight/error check as facts."""
    heads = heads_in(values)
    quality_metric = present(values, quality)[:1]
    snr_metrics: dict[str, Direction] = {m: "negative" for m in quality_metric}
    snr_metrics.update({m: "positive" for m in present(values, NLL_METRICS)[:1]})
    snr = claim_snr(values, schedule, variance, snr_metrics)
    checks = [weight_error_check(curves, weights, arm, reference) for arm in weights if arm != reference]
    snr.facts += [f"check: {line}" for line in checks if line]
    return [
        claim_likelihood(values, NLL_METRICS, heads),
        claim_samples(values, quality, heads),
        claim_equivalence(values, budgets, margins, (*NLL_METRICS, *quality, "eps_star_mse")),
        snr,
    ]


BUDGET_NLL = ("val_vlb_bpd",)


def budget_verdicts(
    budgets: dict[int, Values], quality: tuple[str, ...] = QUALITY_METRICS
) -> dict[int, dict[str, str]]:
    """Claims 1 and 2 at every budget, from the cheap per-budget metrics: {step: {claim: verdict}}."""
    table = {}
    for step, values in sorted(budgets.items()):
        heads = heads_in(values)
        table[step] = {
            "1": claim_likelihood(values, BUDGET_NLL, heads).verdict,
            "2": claim_samples(values, quality, heads).verdict,
        }
    return table


def verdict_changed(table: dict[int, dict[str, str]]) -> dict[str, bool]:
    """Per claim: did the verdict change between the last two budgets?"""
    steps = sorted(table)
    if len(steps) < 2:
        return {}
    last, previous = table[steps[-1]], table[steps[-2]]
    return {claim: last[claim] != previous.get(claim) for claim in last}


def summary_line(claim: Claim) -> str:
    primary = [t for t in claim.tests if t.primary]
    parts = sum(len(t.part_verdicts) for t in primary)
    held = sum(v == HOLDS for t in primary for v in t.part_verdicts)
    return f"Claim {claim.number}: {claim.verdict} ({held} of {parts} primary comparisons hold)"


VERDICT_WORDS = (HOLDS, CONTRADICTED, NOT_SHOWN, EQUIVALENT, DIFFERENT, UNDETERMINED, IDENTITY, PLUMBING)
