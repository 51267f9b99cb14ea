"""Whether a verdict belongs to the optimum or to an early budget, decided here and nowhere else.
Along the budget a headline is *settled* when it is the same at the last two budgets and every arm
in it is flat on that metric, otherwise *provisional at N steps*, with each compared difference
along the budget, its slope per doubling of steps and, where that slope points to the other sign,
the (extrapolated) budget at which it would cross zero. Across optimiser settings (a tuned sweep)
it is settled when every setting that can test it gives the same verdict. `Settlement` joins the
two: the report, its JSON, the command's lines and the tuned report all read it."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum

import numpy as np

from diffbench.analysis.claims import BUDGET_NLL, Claim
from diffbench.analysis.collect import Values
from diffbench.analysis.inference import Comparison, compare, paired_differences
from diffbench.analysis.verdicts import Standing, Verdict
from diffbench.core.arms import Arm
from diffbench.rundir import base_metric, metric_info

FLAT_THRESHOLD = 0.05
"""A curve has flattened when its mean changes by less than this fraction per doubling of steps."""
FAR_DOUBLINGS = 8
"""Zero crossings more than this many doublings of the last budget away are not given a number
(nor computed as a power of two, which overflows for a near-zero slope): a straight line in log
steps says nothing that far out."""


class Reason(Enum):
    """Why a headline is not settled, by kind: what `UNTIL=settled` reads to decide whether
    another doubling of steps can change it (`trainable`), so no caller parses a reason's words."""

    FEW_BUDGETS = "fewer than two budgets measured"
    VERDICT_CHANGED = "the verdict changed between the last budgets"
    MOVING = "an arm still moving"
    HEADING_FOR_ZERO = "a difference heading for zero"
    NO_VERDICT = "no verdict at this budget"
    FINAL_DIFFERS = "the per-budget and the final verdict differ"
    UNMEASURED = "no per-budget record"
    OPTIMISER = "the verdict changes with the optimiser"
    UNTESTED = "not tested on these arms"

    @property
    def trainable(self) -> bool:
        """More steps can remove it: a curve or a verdict that is still moving, or a budget not yet
        reached. The per-budget and final metrics disagreeing at flat curves (measurement, n), the
        optimiser, a missing record and untested heads stay what they are however long one trains."""
        return self in TRAINABLE


TRAINABLE = frozenset(
    {Reason.FEW_BUDGETS, Reason.VERDICT_CHANGED, Reason.MOVING, Reason.HEADING_FOR_ZERO, Reason.NO_VERDICT}
)


def budget_counterpart(metric: str) -> str:
    """The per-budget metric that tracks a final one: the validation VLB for every NLL, the
    small-sample feature distance for every sampler's, the same name otherwise."""
    info = metric_info(metric)
    return BUDGET_NLL if info is not None and info.kind == "nll" else base_metric(metric)


def seed_mean(budgets: dict[int, Values], step: int, arm: Arm, metric: str) -> float | None:
    points = budgets.get(step, {}).get(arm, {}).get(metric)
    return float(np.mean(list(points.values()))) if points else None


def change_per_doubling(budgets: dict[int, Values], arm: Arm, metric: str) -> float | None:
    """|relative change| of the seed mean between the last two budgets, per doubling of steps."""
    steps = [s for s in sorted(budgets) if seed_mean(budgets, s, arm, metric) is not None]
    if len(steps) < 2:
        return None
    previous, last = (seed_mean(budgets, s, arm, metric) for s in steps[-2:])
    assert previous is not None and last is not None
    doublings = math.log2(steps[-1] / steps[-2])
    return abs(last - previous) / max(abs(previous), 1e-12) / doublings


@dataclass(frozen=True)
class DeltaTrend:
    """A compared difference along the budget: its mean at every budget, its slope per doubling of
    steps over the last two budgets (tested across seeds), and the extrapolated zero crossing
    where the slope points to the other sign, in doublings of the last budget."""

    label: str
    metric: str
    deltas: dict[int, float]
    slope: Comparison
    doublings: float | None
    """Doublings of steps past the last budget until Δ = 0 at the current slope (None: the slope
    does not point to the other sign); may be inf for a slope that is zero to rounding."""

    @property
    def far(self) -> bool:
        """The crossing lies beyond FAR_DOUBLINGS, where no number is given."""
        return self.doublings is not None and self.doublings > FAR_DOUBLINGS

    @property
    def crossing(self) -> float | None:
        """The extrapolated step of the zero crossing, within FAR_DOUBLINGS only."""
        if self.doublings is None or self.far:
            return None
        return max(self.deltas) * 2**self.doublings

    def slope_text(self) -> str:
        if self.slope.mean is None:
            return "—"
        interval = (
            ""
            if self.slope.interval is None
            else f" [{self.slope.interval[0]:.3g}, {self.slope.interval[1]:.3g}]"
        )
        return f"{self.slope.mean:+.3g}{interval} per doubling (n={self.slope.n})"

    def crossing_text(self) -> str:
        if self.doublings is None:
            return "—"
        if self.far:
            return f"no crossing within {FAR_DOUBLINGS} doublings"
        return f"≈ {self.crossing:,.0f} steps (extrapolation)"


def delta_trend(budgets: dict[int, Values], a: Arm, b: Arm, metric: str) -> DeltaTrend | None:
    """a − b on `metric` at every budget where both were measured, and its slope per doubling of
    steps over the last two of them (per seed, tested across seeds): where the difference is
    heading now, which the early budgets of a fast-moving arm would distort in a fit over all."""
    deltas: dict[int, float] = {}
    per_step: dict[int, dict[int, float]] = {}
    for step in sorted(budgets):
        arms = budgets[step]
        diffs = paired_differences(arms.get(a, {}).get(metric, {}), arms.get(b, {}).get(metric, {}))
        if diffs:
            deltas[step] = float(np.mean(list(diffs.values())))
            per_step[step] = diffs
    if len(deltas) < 2:
        return None
    previous, last = sorted(deltas)[-2:]
    doublings = math.log2(last / previous)
    seeds = per_step[previous].keys() & per_step[last].keys()
    slopes = {seed: (per_step[last][seed] - per_step[previous][seed]) / doublings for seed in sorted(seeds)}
    slope = compare("slope", metric, slopes, dict.fromkeys(slopes, 0.0))
    doublings = None
    if slope.mean and deltas[last] and np.sign(slope.mean) != np.sign(deltas[last]):
        with np.errstate(over="ignore"):
            doublings = float(np.divide(abs(deltas[last]), abs(slope.mean)))
    return DeltaTrend(f"{a} − {b}", metric, deltas, slope, doublings)


@dataclass(frozen=True)
class Status:
    """Settled or provisional, why, and the numbers behind it."""

    settled: bool
    last: int
    verdicts: dict[int, Verdict]
    trends: list[DeltaTrend]
    reasons: tuple[str, ...] = ()
    moving: tuple[tuple[str, str, float], ...] = ()
    """(arm, per-budget metric, relative change per doubling) of every curve still moving."""
    crossings: tuple[DeltaTrend, ...] = ()
    """Differences heading for the other sign within one more doubling of steps."""
    kinds: tuple[Reason, ...] = ()
    """The kind of every reason above (the moving curves and the crossings included), once each."""

    @staticmethod
    def crossing_text(trend: DeltaTrend) -> str:
        return f"{trend.label} on {trend.metric} would reach zero by about {trend.crossing:,.0f} steps"

    @property
    def standing(self) -> Standing:
        return Standing.SETTLED if self.settled else Standing.PROVISIONAL

    @property
    def text(self) -> str:
        """Every reason, for the claim's own section."""
        if self.settled:
            return self.summary
        moving = [
            f"{arm} moves {100 * change:.1f}% per doubling on {metric}" for arm, metric, change in self.moving
        ]
        crossings = [f"{self.crossing_text(t)} at its slope per doubling" for t in self.crossings]
        return f"{Standing.PROVISIONAL} at {self.last} steps: " + "; ".join(
            [*self.reasons, *crossings, *moving]
        )

    @property
    def summary(self) -> str:
        """One line for the headline: the reasons, with the moving curves counted."""
        if self.settled:
            steps = sorted(self.verdicts)[-2:]
            return (
                f"{Standing.SETTLED}: the same verdict at {steps[0]} and {steps[1]} steps, every arm flat "
                f"(< {100 * FLAT_THRESHOLD:.0f}% per doubling)"
            )
        parts = list(self.reasons)
        if len(self.crossings) == 1:
            parts.append(f"{self.crossing_text(self.crossings[0])} at its slope per doubling")
        elif self.crossings:
            first = min(self.crossings, key=lambda t: t.crossing or 0)
            parts.append(
                f"{len(self.crossings)} differences heading for zero within a doubling (first: "
                f"{self.crossing_text(first)})"
            )
        if self.moving:
            arm, metric, change = max(self.moving, key=lambda m: m[2])
            count = len({a for a, _, _ in self.moving})
            parts.append(
                f"{count} arm{'s' if count > 1 else ''} still moving ≥ {100 * FLAT_THRESHOLD:.0f}% per "
                f"doubling (fastest: {arm}, {100 * change:.0f}% on {metric})"
            )
        return f"{Standing.PROVISIONAL} at {self.last} steps: " + "; ".join(parts)


def claim_status(
    claim: Claim, along: dict[int, dict[int, Verdict]], budgets: dict[int, Values]
) -> Status | None:
    """Settled when the claim's verdict is the same at the last two budgets (and is the final
    evaluation's), every arm of its primary comparisons is flat on the per-budget metric, and no
    compared difference is heading for the other sign within one more doubling of steps."""
    if claim.verdict == Verdict.NOT_TESTED or not claim.primary:
        return None
    verdicts = {step: row[claim.number] for step, row in sorted(along.items()) if claim.number in row}
    trends, moving, unmeasured = [], {}, []
    for test in claim.primary:
        metric = budget_counterpart(test.metric)
        for part in test.parts:
            if len(part.arms) == 2 and (trend := delta_trend(budgets, *part.arms, metric)):
                trends.append(trend)
            for arm in part.arms:
                change = change_per_doubling(budgets, arm, metric)
                if change is None:
                    unmeasured.append(f"{arm} ({metric})")
                elif change >= FLAT_THRESHOLD:
                    moving[(arm.label, metric)] = change
    steps = sorted(verdicts)
    last = steps[-1] if steps else max(budgets, default=0)
    reasons, kinds = [], []
    if len(steps) < 2:
        reasons.append("fewer than two budgets were measured, so no trend is known")
        kinds.append(Reason.FEW_BUDGETS)
    else:
        previous = steps[-2]
        if verdicts[previous] != verdicts[last]:
            reasons.append(
                f"the verdict was '{verdicts[previous]}' at {previous} steps and '{verdicts[last]}' at {last}"
            )
            kinds.append(Reason.VERDICT_CHANGED)
        if verdicts[last] != claim.verdict:
            reasons.append(
                f"at {last} steps the per-budget metrics say '{verdicts[last]}' where the final evaluation "
                f"says '{claim.verdict}'"
            )
            kinds.append(Reason.FINAL_DIFFERS)
    crossings = tuple(t for t in trends if t.doublings is not None and t.doublings <= 1)
    if unmeasured:
        reasons.append("no per-budget record for " + ", ".join(dict.fromkeys(unmeasured)))
        kinds.append(Reason.UNMEASURED)
    if crossings:
        kinds.append(Reason.HEADING_FOR_ZERO)
    if moving:
        kinds.append(Reason.MOVING)
    ordered = tuple((arm, metric, change) for (arm, metric), change in moving.items())
    settled = not reasons and not moving and not crossings
    return Status(settled, last, verdicts, trends, tuple(reasons), ordered, crossings, tuple(kinds))


@dataclass(frozen=True)
class Agreement:
    """Whether a claim's verdict is the same at every optimiser setting that could test it."""

    number: int
    verdicts: dict[str, Verdict]

    @property
    def agrees(self) -> bool | None:
        """None when fewer than two settings could test the claim: agreement is then unknown."""
        return None if len(self.verdicts) < 2 else len(set(self.verdicts.values())) == 1

    @property
    def turns(self) -> bool:
        """Opposite outcomes at two settings (holds and contradicted, equivalent and different),
        not merely a verdict one setting could not reach at this n."""
        found = set(self.verdicts.values())
        return any(verdict.opposite in found for verdict in found)

    @property
    def standing(self) -> str:
        """What the optimiser settings say of the claim, in a few words."""
        if self.agrees is None:
            return "not compared across optimiser settings (fewer than two could test it)"
        if self.agrees:
            count = "both" if len(self.verdicts) == 2 else f"all {len(self.verdicts)}"
            return f"the same at {count} optimiser settings that test it"
        return "turns with the optimiser" if self.turns else "changes with the optimiser"

    @property
    def text(self) -> str:
        if self.agrees is None:
            return self.standing
        if self.agrees:
            return f"{self.standing} ({', '.join(self.verdicts)})"
        by_verdict: dict[Verdict, list[str]] = defaultdict(list)
        for name, verdict in self.verdicts.items():
            by_verdict[verdict].append(name)
        return f"{self.standing}: " + "; ".join(
            f"{verdict} at {', '.join(names)}" for verdict, names in by_verdict.items()
        )


@dataclass(frozen=True)
class Settlement:
    """A claim's standing, worked out once: settled along the budget (`status`, None where the
    claim has no primary comparison) and, where a tuned sweep compared optimiser settings, the
    same verdict at every one of them (`agreement`)."""

    status: Status | None
    agreement: Agreement | None = None

    @property
    def optimiser_unsettles(self) -> bool:
        """The optimiser settings do not (or cannot yet) agree on the verdict."""
        return self.agreement is not None and not self.agreement.agrees

    @property
    def settled(self) -> bool:
        return self.status is not None and self.status.settled and not self.optimiser_unsettles

    @property
    def kinds(self) -> tuple[Reason, ...]:
        """The kind of every reason the claim is not settled (none once it is): a claim without a
        primary comparison is untested on these arms."""
        if self.settled:
            return ()
        kinds = self.status.kinds if self.status is not None else (Reason.UNTESTED,)
        return (*kinds, Reason.OPTIMISER) if self.optimiser_unsettles else kinds

    @property
    def more_steps_help(self) -> bool:
        """Not settled, and for a reason a longer budget can remove."""
        return any(kind.trainable for kind in self.kinds)

    @property
    def tag(self) -> str:
        """`settled`, `provisional`, or `provisional: <what the optimiser does>`; empty where no
        status is known."""
        if self.status is None:
            return ""
        if self.optimiser_unsettles:
            assert self.agreement is not None
            return f"{Standing.PROVISIONAL}: {self.agreement.standing}"
        return Standing.SETTLED if self.settled else Standing.PROVISIONAL

    @property
    def summary(self) -> str:
        """The headline's tail: why it is provisional, or that it is settled."""
        status, agreement = self.status, self.agreement
        if self.optimiser_unsettles:
            assert agreement is not None
            along = f"; along the budget: {status.summary}" if status is not None else ""
            return f"{Standing.PROVISIONAL}: {agreement.text}{along}"
        if status is None:
            return ""
        return status.summary + (f"; {agreement.text}" if agreement is not None else "")
