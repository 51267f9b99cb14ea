"""The report of one group of comparable runs: the verdict on each claim with its scope, its
status along the budget (settled or provisional) and what it could have detected, the comparison
table, the claims' tests, verdicts and differences along the budget, baselines, optimisation,
evaluation noise, where in log SNR the NLL is lost, and figures, as report.json, report.md,
report.html and figures/."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from diffbench import atomic
from diffbench.analysis import figures
from diffbench.analysis.claims import (
    EQUIVALENCE,
    Claim,
    Part,
    Setting,
    Test,
    build_claims,
    final_metric_set,
    found_metrics,
    verdicts_along,
    weight_error_check,
)
from diffbench.analysis.collect import (
    REFERENCE,
    Incomplete,
    Run,
    Values,
    budget_values,
    comparable_settings,
    group_margins,
    schedule_of,
    seed_curves,
    seed_values,
    where,
)
from diffbench.analysis.inference import opposite
from diffbench.analysis.render import Document, Drawing, Section, Table, markdown, write
from diffbench.analysis.sections import (
    bands_section,
    baselines_section,
    comparison_json,
    comparison_section,
    delta_text,
    flatten,
    fmt,
    noise_section,
    optimisation_section,
    p_text,
    settings_section,
)
from diffbench.analysis.settled import (
    FLAT_THRESHOLD,
    Agreement,
    Settlement,
    Status,
    change_per_doubling,
    claim_status,
)
from diffbench.analysis.verdicts import NO_VERDICT, Verdict
from diffbench.core.arms import Arm
from diffbench.core.diffusion import NoiseSchedule, snr
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.rundir import (
    EPS_MSE_BY_T,
    EPS_STAR_DISTANCE,
    QUALITY_METRICS,
    TABLE_METRICS,
    VLB_TERMS,
    X0_TRAJECTORY,
    base_metric,
    metric_info,
    sample_grid,
)

REPORT_STEM = "report"
REPORT_JSON, REPORT_MD, REPORT_HTML = (f"{REPORT_STEM}.{ext}" for ext in ("json", "md", "html"))
SMOKE = "smoke"


def arms_of(runs: list[Run]) -> list[Arm]:
    """The arms present, in display order (by head, then weighting)."""
    return sorted({run.arm for run in runs}, key=lambda arm: arm.order)


def arm_weights(schedule: NoiseSchedule, variance: str, arms: list[Arm]) -> dict[Arm, np.ndarray]:
    """Each arm's w_ε(t) on t = 2..T, from its weighting object (never from its name)."""
    steps = torch.arange(2, schedule.num_timesteps + 1)
    return {
        arm: WEIGHTINGS[arm.weighting].eps_weight(HEADS[arm.head], schedule, steps, variance).numpy()  # type: ignore[arg-type]
        for arm in arms
    }


def table_metrics(values: Values) -> list[str]:
    """The registry's metrics some arm has, each followed by its sampler-tagged variants."""
    found = found_metrics(values)
    ordered = []
    for name in TABLE_METRICS:
        if name in found:
            ordered.append(name)
        ordered += sorted(m for m in found if m != base_metric(m) == name)
    return ordered


def rule_text(test: Test, expect: str | None) -> str:
    """The test and its Holm family: a claim's primary parts form one family, each secondary test
    its own."""
    family = "the claim's primary parts" if test.primary else "this test's parts"
    if test.kind == EQUIVALENCE:
        return f"TOST ±{fmt(test.margin)}, Holm over {family}"
    sign = "<" if expect == "negative" else ">"
    return f"one-sided, Δ {sign} 0, Holm over {family}"


def part_p_text(part: Part) -> str:
    """The p-value that decided the part: towards its expectation, or the opposite one when it is
    contradicted; none for TOST (its verdict is the interval's)."""
    if part.expect is None:
        return "—"
    if part.verdict == Verdict.CONTRADICTED:
        return (
            p_text(part.comparison, part.comparison.p_value(opposite(part.expect))) + ", opposite direction"
        )
    return p_text(part.comparison, part.comparison.p_value(part.expect))


def claim_section(claim: Claim, status: Status | None) -> Section:
    section = Section(f"Claim {claim.number}: {claim.title}", f"claim{claim.number}", level=3)
    section.paragraphs.append(f"**{claim.headline}**")
    if status is not None:
        section.paragraphs.append(status.text[0].upper() + status.text[1:] + ".")
    if claim.detectable:
        section.paragraphs.append(claim.detectable)
    section.paragraphs.append(f"Source: {claim.source}.")
    section.bullets += claim.facts
    rows = []
    for test in claim.tests:
        role = "primary" if test.primary else "secondary"
        for part in test.parts:
            rows.append(
                [
                    f"{test.title} ({role})",
                    test.metric,
                    rule_text(test, part.expect),
                    part.comparison.label,
                    delta_text(part.comparison),
                    part_p_text(part),
                    part.verdict,
                ]
            )
        if len(test.parts) > 1:
            rows.append([f"{test.title} ({role})", test.metric, "", "all parts", "", "", test.verdict])
    if rows:
        section.tables.append(Table(["test", "metric", "rule", "comparison", "Δ", "p", "verdict"], rows))
    return section


def claims_json(claims: list[Claim], settlements: dict[int, Settlement]) -> list[dict]:
    """Each claim with its verdict, its status along the budget, its agreement across optimiser
    settings and whether it is settled (`Settlement`)."""

    def status_json(status: Status | None) -> dict | None:
        if status is None:
            return None
        return {
            "settled": status.settled,
            "text": status.text,
            "summary": status.summary,
            "verdicts": status.verdicts,
            "trends": [
                {
                    "comparison": t.label,
                    "metric": t.metric,
                    "deltas": t.deltas,
                    "slope_per_doubling": comparison_json(t.slope),
                    "zero_crossing_steps": t.crossing,
                    "zero_crossing_doublings": t.doublings if t.doublings != math.inf else None,
                    "zero_crossing": t.crossing_text(),
                }
                for t in status.trends
            ],
        }

    return [
        {
            "number": claim.number,
            "title": claim.title,
            "source": claim.source,
            "verdict": claim.verdict,
            "headline": claim.headline,
            "status": status_json(settlements[claim.number].status),
            "settled": settlements[claim.number].settled,
            "optimiser": (
                {"agrees": agreement.agrees, "text": agreement.text}
                if (agreement := settlements[claim.number].agreement) is not None
                else None
            ),
            "detectable": claim.detectable,
            "facts": claim.facts,
            "tests": [
                {
                    "title": t.title,
                    "metric": t.metric,
                    "kind": t.kind,
                    "primary": t.primary,
                    "margin": t.margin,
                    "verdict": t.verdict,
                    "parts": [
                        {
                            **comparison_json(p.comparison),
                            "head": p.head,
                            "arms": [a.label for a in p.arms],
                            "expect": p.expect,
                            "verdict": p.verdict,
                        }
                        for p in t.parts
                    ],
                }
                for t in claim.tests
            ],
        }
        for claim in claims
    ]


def flatness(budgets: dict[int, Values], arm: Arm, metric: str) -> str:
    """'flat' when the seed mean moved by less than FLAT_THRESHOLD per doubling over the last budgets."""
    change = change_per_doubling(budgets, arm, metric)
    if change is None:
        return "—"
    return f"{'flat' if change < FLAT_THRESHOLD else 'moving'} ({100 * change:.1f}% per doubling)"


def budget_section(
    budgets: dict[int, Values], arms: list[Arm], claims: list[Claim], settlements: dict[int, Settlement]
) -> Section:
    statuses = {number: s.status for number, s in settlements.items()}
    section = Section("Along the training budget", "budgets")
    section.paragraphs.append(
        "Cheap metrics measured during training at each budget (the same seeded noise at every budget), "
        f"mean over seeds. A curve is flat when its mean moves by less than {100 * FLAT_THRESHOLD:.0f}% "
        "per doubling of steps over the last two budgets."
        + (
            " A verdict is settled when it is the same at the last two budgets, every arm in it is flat and "
            "no compared difference heads for the other sign within one more doubling; otherwise it is "
            "provisional."
            if claims
            else ""
        )
    )
    steps = sorted(budgets)
    metrics = sorted({m for step in steps for arm in budgets[step].values() for m in arm})
    for metric in metrics:
        rows = []
        for arm in arms:
            cells = [arm.label]
            for step in steps:
                points = budgets[step].get(arm, {}).get(metric, {})
                cells.append(fmt(float(np.mean(list(points.values())))) if points else "—")
            rows.append([*cells, flatness(budgets, arm, metric)])
        section.tables.append(Table([metric, *map(str, steps), "last doubling"], rows))
    tested = [(c, status) for c in claims if (status := statuses.get(c.number)) is not None]
    if tested:
        rows = [
            [f"claim {c.number}", *(status.verdicts.get(s, "—") for s in steps), c.verdict, status.standing]
            for c, status in tested
        ]
        section.tables.append(Table(["verdict", *map(str, steps), "final evaluation", "status"], rows))
    trend_rows = [
        [
            f"claim {c.number}",
            t.label,
            t.metric,
            *(fmt(t.deltas.get(s)) for s in steps),
            t.slope_text(),
            t.crossing_text(),
        ]
        for c, status in tested
        for t in status.trends
    ]
    if trend_rows:
        section.paragraphs.append(
            "Each primary comparison along the budget: Δ at every budget, the slope of each seed's Δ on "
            "log2(steps) with its 95% paired t-interval, and, where that slope points to the other sign, "
            "the budget at which the straight line in log steps would cross zero — an extrapolation, "
            "not a measurement."
        )
        section.tables.append(
            Table(["claim", "comparison", "metric", *map(str, steps), "slope", "Δ = 0 at"], trend_rows)
        )
    return section


@dataclass
class GroupReport:
    """One group's report, computed and not yet rendered: the runs, what the claims found and how
    settled each one is."""

    group: str
    runs: list[Run]
    incomplete: list[Incomplete]
    arms: list[Arm]
    reference: Arm
    values: Values
    metrics: list[str]
    schedule: NoiseSchedule
    weights: dict[Arm, np.ndarray]
    budgets: dict[int, Values]
    conflicts: list[str]
    plumbing: bool
    claims: list[Claim]
    settlements: dict[int, Settlement]


def compute_report(
    group: str, runs: list[Run], incomplete: list[Incomplete], optimiser: dict[int, Agreement] | None = None
) -> GroupReport:
    """The claims on one group's runs and their settlement (along the budget and, from a tuned
    sweep's `optimiser` agreements, across learning rates); no file is read but the runs' curves."""
    values = seed_values(runs)
    arms = arms_of(runs)
    reference = REFERENCE if REFERENCE in values else (arms[0] if arms else REFERENCE)
    schedule, variance = schedule_of(runs)
    weights = arm_weights(schedule, variance, arms)
    budgets = budget_values(runs)
    margins, conflicts = group_margins(runs)
    setting = Setting(schedule, variance, margins, tuple(conflicts))
    plumbing = any(run.profile == SMOKE for run in runs)
    claims: list[Claim] = []
    if not plumbing:
        curves = seed_curves(runs, EPS_MSE_BY_T)
        checks = tuple(
            line
            for arm in arms
            if arm != reference and (line := weight_error_check(curves, weights, arm, reference))
        )
        claims = build_claims(values, final_metric_set(values), setting, budgets, checks=checks)
    along = {} if plumbing else verdicts_along(budgets, setting)
    settlements = {
        c.number: Settlement(claim_status(c, along, budgets), (optimiser or {}).get(c.number)) for c in claims
    }
    return GroupReport(
        group,
        runs,
        incomplete,
        arms,
        reference,
        values,
        table_metrics(values),
        schedule,
        weights,
        budgets,
        conflicts,
        plumbing,
        claims,
        settlements,
    )


def drawings(report: GroupReport) -> list[Drawing]:
    """The report's figures, each drawn by the write stage into the figures folder."""
    runs, arms, budgets, values = report.runs, report.arms, report.budgets, report.values
    if not runs:
        return []
    log_snr = torch.log(snr(report.schedule.alphas_cumprod[2:])).numpy()
    sampler = next(
        (r.evaluation.get("sample_settings", {}).get("sampler") for r in runs if r.evaluation), None
    )
    first_seed = {}
    for run in sorted(runs, key=lambda r: r.seed):
        if run.directory is not None:
            first_seed.setdefault(run.arm, run.directory)
    quality = next((m for m in QUALITY_METRICS if any(m in v for v in values.values())), None)
    made: list[Drawing] = [
        lambda folder: figures.implied_weights(log_snr, report.weights, folder / "implied_weights.png"),
        lambda folder: figures.budget_curves(budgets, arms, folder / "budget_curves.png"),
    ]
    if quality:
        made.append(
            lambda folder: figures.tradeoff(
                values, arms, "nll_vlb_bpd", quality, folder / "nll_vs_quality.png"
            )
        )
    made += [
        lambda folder: figures.per_t_curves(
            seed_curves(runs, VLB_TERMS), folder / VLB_TERMS.png, VLB_TERMS.ylabel, VLB_TERMS.title
        ),
        lambda folder: figures.per_t_curves(
            seed_curves(runs, EPS_MSE_BY_T),
            folder / EPS_MSE_BY_T.png,
            EPS_MSE_BY_T.ylabel,
            EPS_MSE_BY_T.title,
            logx=True,
        ),
        lambda folder: figures.per_t_curves(
            seed_curves(runs, EPS_STAR_DISTANCE),
            folder / EPS_STAR_DISTANCE.png,
            EPS_STAR_DISTANCE.ylabel,
            EPS_STAR_DISTANCE.title,
        ),
        lambda folder: figures.training_curves(runs, folder / "training_curves.png"),
        lambda folder: figures.image_panels(
            {arm: [d / sample_grid(sampler), d / X0_TRAJECTORY] for arm, d in first_seed.items()},
            [f"samples ({sampler})", "x̂0 along a trajectory"],
            folder / "samples.png",
        ),
    ]
    return made


def overview_section(report: GroupReport, steps: list[int], seeds: list[int]) -> Section:
    """Each claim's headline with its settlement, or the plumbing notice."""
    overview = Section("Verdicts", "verdicts")
    if report.plumbing:
        overview.paragraphs.append(
            f"{NO_VERDICT}. The smoke profile checks that every stage runs; its numbers mean nothing, "
            "so this report states no verdict. Run the default or full profile for evidence."
        )
        return overview
    overview.paragraphs.append(
        f"At {'/'.join(map(str, steps))} training steps: {len(report.runs)} runs of {len(report.arms)} arms, "
        f"seeds {', '.join(map(str, seeds))}, paired by seed. Directional tests are one-sided at α = 0.05 "
        "with Holm's correction over the parts each claim tests; a head without the arms a claim compares "
        "is named, not counted against it. Equivalence is TOST against the margins the runs declared. "
        f"Reference of the comparison table: `{report.reference}`."
    )
    for claim in report.claims:
        line = f"**Claim {claim.number}** — {claim.title}: **{claim.headline}**"
        summary = report.settlements[claim.number].summary
        overview.bullets.append(line + (f" — {summary}" if summary else ""))
    return overview


def problems_of(report: GroupReport) -> list[dict]:
    """What the report could not count: incomplete runs, values that are not finite, margin conflicts."""
    return (
        [
            {"directory": str(i.directory), "reason": i.reason, "arm": i.label, "seed": i.seed}
            for i in report.incomplete
        ]
        + [
            {
                "directory": where(r),
                "reason": "used, but these values are not finite numbers and were left out: "
                + ", ".join(r.dropped),
                "arm": r.arm.label,
                "seed": r.seed,
            }
            for r in report.runs
            if r.dropped
        ]
        + [{"directory": "(group)", "reason": c, "arm": "?", "seed": "?"} for c in report.conflicts]
    )


def render_report(report: GroupReport) -> Document:
    """One computed group report as sections and JSON, with its figures to draw."""
    runs, arms, claims = report.runs, report.arms, report.claims
    comparison, table = comparison_section(report.values, arms, report.metrics, report.reference)
    steps = sorted({run.steps for run in runs})
    seeds = sorted({run.seed for run in runs})
    sections = [overview_section(report, steps, seeds), comparison]
    if not report.plumbing:
        sections += [
            Section("Claims", "claims"),
            *(claim_section(c, report.settlements[c.number].status) for c in claims),
        ]
    if report.budgets:
        sections.append(budget_section(report.budgets, arms, claims, report.settlements))
    sections += [
        s
        for s in (
            baselines_section(runs),
            optimisation_section(runs, arms),
            noise_section(runs, arms),
            bands_section(runs, arms, report.reference, report.schedule),
        )
        if s is not None
    ]
    sections.append(settings_section(runs))
    problems = problems_of(report)
    if problems:
        sections.append(
            Section(
                "Incomplete runs and left-out values",
                "incomplete",
                bullets=[
                    f"`{p['directory']}` ({p['arm']}, seed {p['seed']}): {p['reason']}" for p in problems
                ],
            )
        )
    payload = {
        "group": report.group,
        "plumbing": report.plumbing,
        "reference": report.reference.label,
        "steps": steps,
        "seeds": seeds,
        "metrics": {m: info.label for m in report.metrics if (info := metric_info(m))},
        "table": table,
        "claims": claims_json(claims, report.settlements),
        "runs": len(runs),
        "incomplete": problems,
    }
    return Document(REPORT_STEM, f"diffbench report: {report.group}", sections, payload, drawings(report))


def build_report(
    group: str,
    runs: list[Run],
    incomplete: list[Incomplete],
    out: Path,
    draw: bool = True,
    optimiser: dict[int, Agreement] | None = None,
) -> GroupReport:
    """Compute, render and write one group's report.html, report.md, report.json and (with `draw`)
    figures/ into `out`. `optimiser`: each claim's agreement across learning rates, when a tuned
    sweep holds this group."""
    report = compute_report(group, runs, incomplete, optimiser)
    write(render_report(report), out, draw)
    return report


def axis_families(groups: dict[str, list[Run]], key: str) -> list[dict[str, list[Run]]]:
    """Sets of groups that differ in `key` alone (e.g. optim.lr or model.base_channels), as
    {value of key: runs}, for the checks that compare across groups."""
    families: dict[str, dict[str, list[Run]]] = {}
    for runs in groups.values():
        if not runs:
            continue
        settings = flatten(comparable_settings(runs[0].config))
        value = settings.pop(key, None)
        if value is None:
            continue
        families.setdefault(json.dumps(settings, sort_keys=True), {})[value] = runs
    return [family for family in families.values() if len(family) > 1]


def ranking(runs: list[Run], metric: str) -> list[str]:
    """Arms by their mean over seeds of `metric`, best first."""
    values = seed_values(runs)
    means = {
        arm.label: float(np.mean(list(m[metric].values()))) for arm, m in values.items() if m.get(metric)
    }
    return sorted((a for a in means if math.isfinite(means[a])), key=means.__getitem__)


def axis_check(groups: dict[str, list[Run]], key: str, metrics: tuple[str, ...]) -> list[Section]:
    """Per family of groups differing only in `key`: each arm's rank per value, and whether the
    ranking of the arms changes (Kendall's τ between the rankings at the extreme values)."""
    sections = []
    for family in axis_families(groups, key):
        values = sorted(family, key=lambda v: json.loads(v))
        for metric in metrics:
            ranks = {value: ranking(family[value], metric) for value in values}
            common = set.intersection(*(set(r) for r in ranks.values()))
            if len(common) < 2:
                continue
            arms = [a for a in ranks[values[0]] if a in common]
            rows = [[arm, *(str(ranks[v].index(arm) + 1) for v in values)] for arm in arms]
            first = [ranks[values[0]].index(a) for a in arms]
            last = [ranks[values[-1]].index(a) for a in arms]
            tau = float(kendalltau(first, last).statistic)
            changed = any([ranks[v].index(a) for a in arms] != first for v in values)
            sections.append(
                Section(
                    f"{metric} ranking across {key}",
                    f"{key}-{metric}",
                    [
                        f"Rank of each arm (1 = lowest mean {metric}) at {key} = {', '.join(values)}. "
                        f"The ranking {'changes' if changed else 'does not change'} with {key} "
                        f"(Kendall's τ between the first and last = {tau:+.2f}); one seed per value "
                        "unless the sweep ran more."
                    ],
                    [Table(["arm", *(f"{key}={v}" for v in values)], rows)],
                )
            )
    return sections


def write_axis_checks(groups: dict[str, list[Run]], out: Path) -> list[Path]:
    """`<out>/lr_check.md` and `<out>/width_check.md` where the runs hold such families."""
    written = []
    checks = {
        "lr_check": ("optim.lr", ("nll_vlb_bpd", *QUALITY_METRICS)),
        "width_check": ("model.base_channels", ("eps_star_mse", "nll_vlb_bpd", *QUALITY_METRICS)),
    }
    for name, (key, metrics) in checks.items():
        sections = axis_check(groups, key, metrics)
        if sections:
            path = out / f"{name}.md"
            atomic.write_text(
                path, markdown(f"diffbench: does the ranking of arms depend on {key}?", sections, [])
            )
            written.append(path)
    return written
