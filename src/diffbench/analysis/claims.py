"""The claims the suite tests, stated as the sources state them, each turned into seed-paired
comparisons and a calibrated verdict (`analysis.inference`), on the arms the runs hold.

1. Likelihood: on each head, the ELBO gives lower NLL than DDPM's L_simple (the `eps` weighting).
2. Samples: on each head, the `eps` weighting gives lower FD/KID than the ELBO, at every sampler.
3. Equivalence of heads, three ways: (a) the ELBOs are one function of ε̂ (checked on numbers),
   (b) the same optimum (on gmm: every head's distance to ε* shrinks with budget), (c) the same
   training outcome at a budget (TOST between heads under one weighting).
4. The SNR argument within one head: of two weightings, the one with the larger share of its
   ε-space weight on log SNR < 0 gives the lower FD/KID and the higher NLL.

A directional claim is tested on the heads for which the runs hold both arms; a head without them
is named with the sweep that would test it, never counted as a failing part. It "holds" when every
tested part's one-sided test passes after Holm's correction within the claim, is "contradicted"
when one passes the other way, else "not shown at this n".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats

from diffbench.analysis.collect import Curves, Values
from diffbench.analysis.inference import (
    Comparison,
    Direction,
    claim_mde_multiplier,
    combined_equivalence,
    compare,
    directional_claim,
    equivalence_test,
    mde_multiplier,
)
from diffbench.analysis.verdicts import Outcome, Verdict
from diffbench.core.arms import Arm
from diffbench.core.diffusion import NoiseSchedule, q_sample
from diffbench.core.heads import HEADS, Head
from diffbench.core.weightings import WEIGHTINGS, LossInputs
from diffbench.rundir import AT, KID_METRICS, NLL_METRICS, QUALITY_METRICS, base_metric, metric_at

DIRECTIONAL, TREND, EQUIVALENCE = "directional", "trend", "equivalence"
GRID = "make sweep OBJ=grid"
BUDGET_NLL = "val_vlb_bpd"
"""The per-budget stand-in for every NLL: the importance-sampled validation VLB."""


@dataclass(frozen=True)
class MetricSet:
    """The metrics the claims read, the primary one of each kind first: NLLs, the main sampler's
    sample metrics, KIDs, and the tags of the further samplers the sample metrics were measured at."""

    nll: tuple[str, ...]
    quality: tuple[str, ...]
    kid: tuple[str, ...]
    samplers: tuple[str, ...] = ()


def found_metrics(values: Values) -> set[str]:
    return {metric for metrics in values.values() for metric in metrics}


def final_metric_set(values: Values) -> MetricSet:
    """What the final evaluation measured, in the registry's order."""
    found = found_metrics(values)
    quality = tuple(m for m in QUALITY_METRICS if m in found)
    tags = tuple(sorted({m.partition(AT)[2] for m in found if quality and m != base_metric(m) == quality[0]}))
    return MetricSet(
        tuple(m for m in NLL_METRICS if m in found),
        quality,
        tuple(m for m in KID_METRICS if m in found),
        tags,
    )


def budget_metric_set(values: Values) -> MetricSet:
    """What every budget measured: the validation VLB and the small-sample FD/KID."""
    found = found_metrics(values)
    return MetricSet(
        tuple(m for m in (BUDGET_NLL,) if m in found),
        tuple(m for m in QUALITY_METRICS if m in found),
        tuple(m for m in KID_METRICS if m in found),
    )


@dataclass(frozen=True)
class Setting:
    """What the claims need besides the numbers: the schedule the runs were trained with (for the
    weights) and the equivalence margins they declared, or why none can be used."""

    schedule: NoiseSchedule
    variance: str
    margins: dict[str, float]
    margin_conflicts: tuple[str, ...] = ()
    shares: dict[Arm, float] = field(default_factory=dict, compare=False, repr=False)

    def low_snr_share(self, arm: Arm) -> float:
        """The arm's low-SNR share under this schedule (computed once per arm)."""
        if arm not in self.shares:
            self.shares[arm] = low_snr_share(arm, self.schedule, self.variance)
        return self.shares[arm]


@dataclass
class Part:
    """One comparison of a test: a − b for a pair of arms, or a trend over arms ordered by weight."""

    head: str
    arms: tuple[Arm, ...]
    comparison: Comparison
    expect: Direction | None = None
    verdict: Verdict = Verdict.NOT_SHOWN


@dataclass
class Test:
    """A family of parts under one rule: directional (one-sided), trend (Kendall's τ, sign-flip) or
    TOST equivalence against `margin`."""

    title: str
    metric: str
    kind: str
    parts: list[Part]
    primary: bool = True
    margin: float | None = None
    verdict: Verdict = Verdict.NOT_SHOWN


@dataclass
class Claim:
    number: int
    title: str
    source: str
    tests: list[Test] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    verdict: Verdict = Verdict.NOT_TESTED
    headline: str = ""
    detectable: str | None = None

    @property
    def primary(self) -> list[Test]:
        return [t for t in self.tests if t.primary]


def heads_in(values: Values) -> list[str]:
    """Heads with any arm in these runs, in registry order."""
    return [h for h in HEADS if any(arm.head == h for arm in values)]


def find(values: Values, head: str, weighting: str) -> Arm | None:
    """The arm of (head, weighting) in these runs, or one training the very same loss (a head's
    own MSE is the weighting named after it: eps_simple stands for eps_eps and back)."""
    wanted = Arm(head, weighting)
    if wanted in values:
        return wanted
    return next((arm for arm in values if arm.objective == wanted.objective), None)


def seeds_of(values: Values, arm: Arm, metric: str) -> dict[int, float]:
    return values.get(arm, {}).get(metric, {})


def comparison(values: Values, a: Arm, b: Arm, metric: str) -> Comparison:
    return compare(f"{a} − {b}", metric, seeds_of(values, a, metric), seeds_of(values, b, metric))


def join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" and {words[-1]}"


def combine(verdicts: list[Verdict]) -> Verdict:
    """Directional parts as one verdict: contradicted if any part is, holds if every part does."""
    if Verdict.CONTRADICTED in verdicts:
        return Verdict.CONTRADICTED
    return Verdict.HOLDS if verdicts and all(v == Verdict.HOLDS for v in verdicts) else Verdict.NOT_SHOWN


def decide_directional(tests: list[Test]) -> Verdict:
    """Holm over every part of `tests` as one family; each part and test gets its verdict."""
    parts = [part for test in tests for part in test.parts]
    if not parts:
        return Verdict.NOT_TESTED
    result = directional_claim([p.comparison for p in parts], [p.expect or "negative" for p in parts])
    for part, decided in zip(parts, result.parts):
        part.verdict = decided.verdict
    for test in tests:
        test.verdict = combine([p.verdict for p in test.parts]) if test.parts else Verdict.NOT_TESTED
    return result.verdict


def decide_equivalence(tests: list[Test], margin: float) -> Verdict:
    """TOST over every pair of `tests` as one Holm family; each pair and test gets its verdict."""
    parts = [part for test in tests for part in test.parts]
    if not parts:
        return Verdict.NOT_TESTED
    for part, verdict in zip(parts, equivalence_test([p.comparison for p in parts], margin)):
        part.verdict = verdict
    for test in tests:
        test.verdict = combined_equivalence([p.verdict for p in test.parts])
    return combined_equivalence([p.verdict for p in parts])


def pair_parts(
    values: Values, winner: str, loser: str, metric: str, expect: Direction, skip: set | None = None
) -> tuple[list[Part], list[str]]:
    """(head winner) − (head loser) on every head holding both arms with this metric, and the heads
    that lack one. Pairs in `skip` (already compared under this metric) are left out."""
    parts, untested = [], []
    for head in heads_in(values):
        a, b = find(values, head, winner), find(values, head, loser)
        if a is None or b is None or a == b:
            untested.append(head)
            continue
        if skip is not None and (a, b) in skip:
            continue
        c = comparison(values, a, b, metric)
        if c.n:
            parts.append(Part(head, (a, b), c, expect))
        else:
            untested.append(head)
    return parts, untested


def scoped(verdict: Verdict, parts: list[Part], untested: list[str], sweep: str | dict[str, str]) -> str:
    """`holds on eps; x0 and score need make sweep OBJ=grid`: the verdict with the heads it covers
    and those it could not test, naming the sweep that would (one for all, or one per head)."""
    tested = list(dict.fromkeys(p.head for p in parts))
    need = ""
    if untested:
        sweeps = {h: sweep if isinstance(sweep, str) else sweep.get(h, GRID) for h in untested}
        by_sweep: dict[str, list[str]] = {}
        for head, name in sweeps.items():
            by_sweep.setdefault(name, []).append(head)
        need = "; ".join(
            f"{join(heads)} {'needs' if len(heads) == 1 else 'need'} `{name}`"
            for name, heads in by_sweep.items()
        )
    if not tested:
        return f"{Verdict.NOT_TESTED}: no head has the arms this claim compares" + (
            f"; {need}" if need else ""
        )
    by_head: dict[str, list[Verdict]] = {}
    for part in parts:
        by_head.setdefault(part.head, []).append(part.verdict)
    heads_by_verdict: dict[Verdict, list[str]] = {}
    for head, verdicts in by_head.items():
        heads_by_verdict.setdefault(combine(verdicts), []).append(head)
    if len(heads_by_verdict) == 1:
        text = f"{verdict} on {join(tested)}"
    else:
        text = f"{verdict}: " + ", ".join(f"{v} on {join(h)}" for v, h in heads_by_verdict.items())
    return text + (f"; {need}" if need else "")


def secondary_pairs(
    values: Values, claim: Claim, metrics: tuple[str, ...], contrasts: list[tuple[str, str, Direction]]
) -> None:
    """Further directional tests, each its own Holm family, leaving out pairs already compared
    under the same metric (the eps head's own MSE is its eps weighting)."""
    for metric in metrics:
        seen = {p.arms for t in claim.tests if t.metric == metric for p in t.parts}
        for winner, loser, expect in contrasts:
            parts, _ = pair_parts(values, winner, loser, metric, expect, seen)
            if not parts:
                continue
            seen |= {p.arms for p in parts}
            test = Test(
                f"{winner} {'<' if expect == 'negative' else '>'} {loser}", metric, DIRECTIONAL, parts, False
            )
            decide_directional([test])
            claim.tests.append(test)


def primary_pairs(claim: Claim, values: Values, winner: str, loser: str, metric: str) -> list[Part]:
    """A claim's one primary test, (head winner) < (head loser) on every head holding both arms,
    decided as the claim's Holm family, with the headline naming the heads it could not test."""
    parts, untested = pair_parts(values, winner, loser, metric, "negative")
    claim.tests.append(Test(f"{winner} < {loser}", metric, DIRECTIONAL, parts))
    claim.verdict = decide_directional(claim.tests)
    claim.headline = scoped(claim.verdict, parts, untested, GRID)
    return parts


def claim_likelihood(values: Values, metrics: MetricSet) -> Claim:
    claim = Claim(
        1,
        "ELBO training gives lower NLL than L_simple, on each head",
        "DDPM Table 2 (3.70 vs 3.75 bpd on CIFAR-10); improved DDPM's L_vlb",
    )
    if not metrics.nll:
        claim.headline = f"{Verdict.NOT_TESTED}: these runs measured no NLL"
        return claim
    primary_pairs(claim, values, "elbo", "eps", metrics.nll[0])
    secondary_pairs(
        values,
        claim,
        metrics.nll,
        [("elbo", "eps", "negative"), ("elbo_is", "eps", "negative"), ("elbo", "own", "negative")],
    )
    return claim


def claim_samples(values: Values, metrics: MetricSet) -> Claim:
    claim = Claim(
        2,
        "L_simple (the eps weighting) gives better samples than the ELBO, on each head",
        "DDPM Table 2 (FID 3.17 vs 13.51 on CIFAR-10)",
    )
    if not metrics.quality:
        claim.headline = f"{Verdict.NOT_TESTED}: these runs measured no sample metric"
        return claim
    main = metrics.quality[0]
    parts = primary_pairs(claim, values, "eps", "elbo", main)
    along = {}
    for tag in metrics.samplers:
        variant, _ = pair_parts(values, "eps", "elbo", metric_at(main, tag), "negative")
        if variant:
            test = Test(f"eps < elbo, {tag} samples", metric_at(main, tag), DIRECTIONAL, variant, False)
            along[tag] = decide_directional([test])
            claim.tests.append(test)
    if along and parts:
        same = all(v == claim.verdict for v in along.values())
        claim.headline += (
            f"; the same with {join(list(along))} samples"
            if same
            else "; depends on the sampler: "
            + ", ".join(f"{v} with {tag} samples" for tag, v in along.items())
        )
    secondary_pairs(
        values,
        claim,
        (*metrics.quality, *metrics.kid),
        [("eps", "elbo", "negative"), ("own", "elbo", "negative")],
    )
    return claim


def output_for(head: Head, eps_hat: torch.Tensor, xt: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The output this head reads as ε̂, from its own `to_eps` alone: a head's conversion is affine
    in its output element by element, ε̂ = to_eps(0) + (to_eps(1) − to_eps(0))·output, so it
    inverts for any head registered in HEADS without a table of known heads. One correction step
    with the residual removes the rounding of the difference (to_eps(0) can be large beside the slope)."""
    offset = head.to_eps(torch.zeros_like(eps_hat), xt, alpha_bar)
    slope = head.to_eps(torch.ones_like(eps_hat), xt, alpha_bar) - offset
    output = (eps_hat - offset) / slope
    return output + (eps_hat - head.to_eps(output, xt, alpha_bar)) / slope


def elbo_identity(num_timesteps: int = 1000, seed: int = 0) -> float:
    """The largest relative difference between the registered heads' ELBO losses for one random
    ε̂ per example, each head's output converted from it: they are one function of ε̂."""
    return heads_identity(tuple(HEADS.values()), num_timesteps, seed)


@functools.cache
def heads_identity(heads: tuple[Head, ...], num_timesteps: int, seed: int) -> float:
    """`elbo_identity` for these heads (cached per set of head objects)."""
    generator = torch.Generator().manual_seed(seed)
    schedule = NoiseSchedule("linear", num_timesteps)
    t = torch.randint(1, num_timesteps + 1, (64,), generator=generator)
    x0 = torch.randint(0, 17, (64, 1, 8, 8), generator=generator).double() / 8 - 1
    eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    alpha_bar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    xt = q_sample(x0, eps, alpha_bar)
    eps_hat = eps + torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    losses = []
    for head in heads:
        target = head.target(x0, eps, alpha_bar)
        output = output_for(head, eps_hat, xt, alpha_bar)
        inputs = LossInputs(x0, xt, t, output, target, num_timesteps, 17, "small")
        losses.append(WEIGHTINGS["elbo"].loss(head, schedule, inputs))
    stack = torch.stack(losses)
    return float(((stack - stack[0]).abs() / stack[0].abs()).max())


@dataclass(frozen=True)
class OptimumTrend:
    """Slope of log(ELBO-weighted distance to ε*) on log(steps) across seeds, and the last distance."""

    arm: Arm
    slope: Comparison
    final: float
    steps: int

    @property
    def shrinking(self) -> bool:
        return self.slope.interval is not None and self.slope.interval[1] < 0

    def text(self) -> str:
        interval = (
            ""
            if self.slope.interval is None
            else f" [{self.slope.interval[0]:.3g}, {self.slope.interval[1]:.3g}]"
        )
        return (
            f"{self.arm}: slope of log distance vs log steps {self.slope.mean:.3g}{interval} "
            f"(n={self.slope.n}); ELBO-weighted distance at {self.steps} steps {self.final:.4g} bpd"
        )


def eps_star_trend(budgets: dict[int, Values], arm: Arm) -> OptimumTrend | None:
    """Per seed, the slope of log distance to ε* on log steps, with its t-interval: negative means
    the head is still approaching the optimum."""
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
        return None
    last = seeds_of(budgets[steps[-1]], arm, "eps_star_elbo_bpd")
    slope = compare("slope", "log distance / log steps", slopes, dict.fromkeys(slopes, 0.0))
    final = float(np.mean(list(last.values()))) if last else float("nan")
    return OptimumTrend(arm, slope, final, steps[-1])


EQUIVALENCE_METRICS = (*NLL_METRICS, *QUALITY_METRICS, *KID_METRICS, "eps_star_mse", BUDGET_NLL)


def claim_equivalence(
    values: Values, metrics: MetricSet, setting: Setting, budgets: dict[int, Values]
) -> Claim:
    claim = Claim(
        3,
        "The heads are equivalent",
        "the heads are affine in one another at every t (Ho et al.; Kingma et al.; Salimans & Ho)",
    )
    identity = elbo_identity()
    claim.facts.append(
        f"(a) same objective: the {len(HEADS)} heads' ELBO losses on random outputs differ by at most "
        f"{identity:.1e} (relative): one function of ε̂."
    )
    pieces = [f"one objective (a: {identity:.0e})"]
    heads = heads_in(values)
    trends = [t for h in heads if (arm := find(values, h, "elbo")) and (t := eps_star_trend(budgets, arm))]
    for trend in trends:
        claim.facts.append(f"(b) same optimum, {trend.arm.head}: {trend.text()}")
    if trends:
        falling = [t.arm.head for t in trends if t.shrinking]
        pieces.append(
            f"optimum not reached (b: distance to ε* still falling on {join(falling)} "
            f"at {trends[0].steps} steps)"
            if falling
            else f"(b: no head's distance to ε* falls measurably at {trends[0].steps} steps)"
        )
    if setting.margin_conflicts:
        claim.facts += [
            f"(c) not judged, the runs declare different margins: {c}" for c in setting.margin_conflicts
        ]
        claim.headline = "; ".join([*pieces, "(c) not judged: the runs declare different margins"])
        return claim
    found = found_metrics(values)
    judged = [m for m in EQUIVALENCE_METRICS if m in found and m in setting.margins]
    shared = [w for w in WEIGHTINGS if w != "own"]
    for index, metric in enumerate(judged):
        margin = setting.margins[metric]
        tests = []
        for weighting in [*shared, "own"]:
            arms = [a for h in heads if (a := find(values, h, weighting)) is not None]
            parts = [
                Part(f"{a.head}/{b.head}", (a, b), c)
                for i, a in enumerate(arms)
                for b in arms[i + 1 :]
                if (c := comparison(values, a, b, metric)).n
            ]
            if parts:
                title = f"(c) same outcome under {weighting}" + (
                    " (a different ε-weighting per head)" if weighting == "own" else ""
                )
                tests.append(
                    Test(title, metric, EQUIVALENCE, parts, index == 0 and weighting != "own", margin)
                )
        family = [t for t in tests if t.primary]
        if family:
            claim.verdict = decide_equivalence(family, margin)
            differ = sum(t.verdict == Verdict.DIFFERENT for t in family)
            equal = sum(t.verdict == Verdict.EQUIVALENT for t in family)
            outcome = Outcome.of(differ, equal, len(family))
            count = differ if differ else equal
            word = ("differs" if count == 1 else "differ") if differ else Verdict.EQUIVALENT
            pieces.append(
                f"{outcome} (c: {count} of {len(family)} weighting{'s' if len(family) > 1 else ''} {word} "
                f"on {metric}, margin ±{margin:g})"
            )
        for test in tests:
            if not test.primary:
                decide_equivalence([test], margin)
        claim.tests += tests
    if not any(t.primary for t in claim.tests):
        pieces.append("(c) not tested: no weighting is trained on two heads with a declared margin")
    claim.headline = "; ".join(pieces)
    return claim


def low_snr_share(arm: Arm, schedule: NoiseSchedule, variance: str) -> float:
    """The share of an arm's ε-space weight (uniform t) on steps with log SNR < 0."""
    t = torch.arange(1, schedule.num_timesteps + 1)
    weight = WEIGHTINGS[arm.weighting].eps_weight(HEADS[arm.head], schedule, t, variance)  # type: ignore[arg-type]
    low = torch.log(schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])) < 0
    return float(weight[low].sum() / weight.sum())


def weighting_order(values: Values, head: str, setting: Setting) -> list[tuple[Arm, float]]:
    """The head's distinct objectives (elbo_is is the ELBO's weighting with another estimator, and
    a head's own MSE is its head-named weighting), by increasing low-SNR share."""
    arms: dict[Arm, Arm] = {}
    for arm in sorted(
        (a for a in values if a.head == head and a.weighting != "elbo_is"), key=lambda a: a.order
    ):
        arms.setdefault(arm.objective, arm)
    shares = [(arm, setting.low_snr_share(arm)) for arm in arms.values()]
    return sorted(shares, key=lambda pair: pair[1])


def trend_part(
    values: Values, head: str, order: list[tuple[Arm, float]], metric: str, expect: Direction
) -> Part | None:
    """Kendall's τ per seed between the low-SNR share and the metric over ≥ 3 weightings, tested
    across seeds by the exact sign-flip test (seeds that agree exactly carry n signs' evidence)."""
    arms = [a for a, _ in order]
    seeds = set.intersection(*(set(seeds_of(values, a, metric)) for a in arms))
    if not seeds:
        return None
    taus = {
        seed: float(
            stats.kendalltau([s for _, s in order], [values[a][metric][seed] for a in arms]).statistic
        )
        for seed in sorted(seeds)
    }
    label = f"τ(low-SNR share, {metric}) over {', '.join(a.label for a in arms)}"
    trend = compare(label, metric, taus, dict.fromkeys(taus, 0.0), permutation_from=1)
    return Part(head, tuple(arms), trend, expect)


def snr_parts(
    values: Values, setting: Setting, metric: str, expect: Direction
) -> tuple[list[Part], list[str]]:
    """Per head: with two weightings, (larger low-SNR share) − (smaller); with three or more, the
    τ trend. The expected sign is the same for every head; which arm is which comes from the weights."""
    parts, untested = [], []
    for head in heads_in(values):
        order = weighting_order(values, head, setting)
        if len(order) < 2 or order[-1][1] - order[0][1] < 1e-9:
            untested.append(head)
            continue
        if len(order) == 2:
            (low, _), (high, _) = order
            c = comparison(values, high, low, metric)
            part = Part(head, (high, low), c, expect) if c.n else None
        else:
            part = trend_part(values, head, order, metric, expect)
        if part is None:
            untested.append(head)
        else:
            parts.append(part)
    return parts, untested


def claim_snr(values: Values, metrics: MetricSet, setting: Setting, checks: tuple[str, ...] = ()) -> Claim:
    """More ε-space weight on log SNR < 0 → lower sample metric and higher NLL, within each head;
    `checks`: whether training did what each arm's weights say (`weight_error_check`), as facts."""
    claim = Claim(
        4,
        "Moving weight to low SNR buys sample quality and costs likelihood, within a head",
        "the SNR-weighting argument for L_simple (Ho et al. 2020; Kingma & Gao 2023)",
    )
    for head in heads_in(values):
        order = weighting_order(values, head, setting)
        if len(order) >= 2:
            claim.facts.append(
                f"{head}: low-SNR share of the ε-space weight: " + ", ".join(f"{a} {s:.2f}" for a, s in order)
            )
    contrasts = [(m, "negative", "lower") for m in metrics.quality[:1]] + [
        (m, "positive", "higher") for m in metrics.nll[:1]
    ]
    untested: list[str] = []
    for metric, expect, word in contrasts:
        parts, missing = snr_parts(values, setting, metric, expect)
        untested += [h for h in missing if h not in untested]
        claim.tests.append(Test(f"more low-SNR weight → {word} {metric}", metric, DIRECTIONAL, parts))
    claim.tests = [t for t in claim.tests if t.parts]
    claim.verdict = decide_directional(claim.tests)
    all_parts = [p for t in claim.tests for p in t.parts]
    tested = {p.head for p in all_parts}
    untested = [h for h in untested if h not in tested]
    claim.headline = scoped(claim.verdict, all_parts, untested, {"eps": "make sweep OBJ=weightings"})
    if any(len(p.arms) > 2 for p in all_parts):
        n = min(p.comparison.n for p in all_parts if len(p.arms) > 2)
        claim.facts.append(
            f"A trend over three or more weightings is an exact sign-flip test of the seeds' Kendall τ: "
            f"its smallest p at n = {n} is 2^-{n} = {2.0**-n:.3g}, so it needs at least 5 seeds to pass "
            "α = 0.05."
        )
    for metric, expect, word in [(m, "negative", "lower") for m in (*metrics.quality[1:], *metrics.kid)] + [
        (m, "positive", "higher") for m in metrics.nll[1:]
    ]:
        parts, _ = snr_parts(values, setting, metric, expect)
        if parts:
            test = Test(f"more low-SNR weight → {word} {metric}", metric, DIRECTIONAL, parts, False)
            decide_directional([test])
            claim.tests.append(test)
    claim.facts += [f"check: {line}" for line in checks]
    return claim


def weight_error_check(
    curves: Curves, weights: dict[Arm, np.ndarray], arm: Arm, reference: Arm
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


def claim_detectable(claim: Claim) -> str | None:
    """The effect per part at which the claim as stated (every tested part, Holm) holds with 80%
    power at this n, beside a single comparison's: what "not shown" can and cannot rule out."""
    parts = [p for t in claim.primary for p in t.parts]
    directional = all(t.kind == DIRECTIONAL for t in claim.primary)
    if (
        claim.verdict == Verdict.NOT_TESTED
        or not parts
        or not directional
        or any(len(p.arms) > 2 for p in parts)
    ):
        return None
    n = min(p.comparison.n for p in parts)
    if n < 2 or any(p.comparison.sd is None for p in parts):
        return None
    multiplier = claim_mde_multiplier(n, len(parts))
    low, high = (np.sqrt((n - 1) / stats.chi2.ppf(q, n - 1)) for q in (0.975, 0.025))
    if not np.isfinite(multiplier):
        return (
            f"Claim-level detectable effect: none — with {len(parts)} parts at n = {n} the exact sign-flip "
            f"test's smallest p (2^-{n}) cannot pass Holm's first threshold; add seeds."
        )
    per_part = ", ".join(f"{p.comparison.label} {multiplier * p.comparison.sd:.3g}" for p in parts)
    return (
        f"Claim-level detectable effect (80% power, every tested part after Holm, n = {n}, "
        f"{len(parts)} part{'s' if len(parts) > 1 else ''}): {multiplier:.2f} paired sd per part — "
        f"{per_part} (one comparison alone: {mde_multiplier(n):.2f} sd). At n = {n} the seed sd itself is "
        "uncertain: its "
        f"95% interval runs from {low:.2f}× to {high:.2f}× the estimate."
    )


def build_claims(
    values: Values,
    metrics: MetricSet,
    setting: Setting,
    budgets: dict[int, Values] | None = None,
    detectable: bool = True,
    checks: tuple[str, ...] = (),
) -> list[Claim]:
    """The four claims on one set of values (the final evaluation, or one budget's cheap metrics;
    the claim-level detectable effect is simulated only when asked for; `checks` go to claim 4)."""
    claims = [
        claim_likelihood(values, metrics),
        claim_samples(values, metrics),
        claim_equivalence(values, metrics, setting, budgets or {}),
        claim_snr(values, metrics, setting, checks),
    ]
    for claim in claims if detectable else ():
        claim.detectable = claim_detectable(claim)
    return claims


def verdicts_along(budgets: dict[int, Values], setting: Setting) -> dict[int, dict[int, Verdict]]:
    """{step: {claim number: verdict}} from the cheap metrics measured at every budget."""
    return {
        step: {
            c.number: c.verdict
            for c in build_claims(values, budget_metric_set(values), setting, detectable=False)
        }
        for step, values in sorted(budgets.items())
    }
