"""The report of one group of comparable runs: the verdict on each claim with its scope, its
status along the budget (settled or provisional) and what it could have detected, the comparison
table, the claims' tests, verdicts and differences along the budget, baselines, optimisation,
evaluation noise, where in log SNR the NLL is lost, and figures, as report.json, report.md,
report.html and figures/."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from diffbench import atomic
from diffbench.analysis import figures
from diffbench.analysis.claims import (
    EQUIVALENCE,
    PLUMBING,
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
from diffbench.analysis.inference import CONTRADICTED, opposite
from diffbench.analysis.optimiser import Agreement
from diffbench.analysis.render import Section, Table, html_page, markdown
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
from diffbench.analysis.settled import FLAT_THRESHOLD, Status, change_per_doubling, claim_status
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

REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
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
    if part.verdict == CONTRADICTED:
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


def claims_json(
    claims: list[Claim], statuses: dict[int, Status | None], optimiser: dict[int, Agreement]
) -> list[dict]:
    """Each claim with its verdict and status; `settled` needs the budget status settled and, where
    a tuned sweep compared optimiser settings, the same verdict at every one of them."""

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
            "status": status_json(statuses.get(claim.number)),
            "settled": bool(
                (status := statuses.get(claim.number)) is not None
                and status.settled
                and (claim.number not in optimiser or optimiser[claim.number].agrees is True)
            ),
            "optimiser": (
                {"agrees": optimiser[claim.number].agrees, "text": optimiser[claim.number].text}
                if claim.number in optimiser
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
    budgets: dict[int, Values], arms: list[Arm], claims: list[Claim], statuses: dict[int, Status | None]
) -> Section:
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
    tested = [c for c in claims if statuses.get(c.number) is not None]
    if tested:
        rows = [
            [
                f"claim {c.number}",
                *(statuses[c.number].verdicts.get(s, "—") for s in steps),
                c.verdict,
                "settled" if statuses[c.number].settled else "provisional",
            ]
            for c in tested
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
        for c in tested
        for t in statuses[c.number].trends
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


def make_figures(
    runs: list[Run],
    arms: list[Arm],
    weights: dict[Arm, np.ndarray],
    schedule: NoiseSchedule,
    budgets: dict,
    values: dict,
    out: Path,
) -> list[str]:
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    log_snr = torch.log(snr(schedule.alphas_cumprod[2:])).numpy()
    sampler = next(
        (r.evaluation.get("sample_settings", {}).get("sampler") for r in runs if r.evaluation), None
    )
    first_seed = {}
    for run in sorted(runs, key=lambda r: r.seed):
        if run.directory is not None:
            first_seed.setdefault(run.arm, run.directory)
    quality = next((m for m in QUALITY_METRICS if any(m in v for v in values.values())), None)
    made = [
        figures.implied_weights(log_snr, weights, folder / "implied_weights.png"),
        figures.budget_curves(budgets, arms, folder / "budget_curves.png"),
        figures.tradeoff(values, arms, "nll_vlb_bpd", quality, folder / "nll_vs_quality.png")
        if quality
        else None,
        figures.per_t_curves(
            seed_curves(runs, VLB_TERMS), folder / VLB_TERMS.png, VLB_TERMS.ylabel, VLB_TERMS.title
        ),
        figures.per_t_curves(
            seed_curves(runs, EPS_MSE_BY_T),
            folder / EPS_MSE_BY_T.png,
            EPS_MSE_BY_T.ylabel,
            EPS_MSE_BY_T.title,
            logx=True,
        ),
        figures.per_t_curves(
            seed_curves(runs, EPS_STAR_DISTANCE),
            folder / EPS_STAR_DISTANCE.png,
            EPS_STAR_DISTANCE.ylabel,
            EPS_STAR_DISTANCE.title,
        ),
        figures.training_curves(runs, folder / "training_curves.png"),
        figures.image_panels(
            {arm: [d / sample_grid(sampler), d / X0_TRAJECTORY] for arm, d in first_seed.items()},
            [f"samples ({sampler})", "x̂0 along a trajectory"],
            folder / "samples.png",
        ),
    ]
    return [path.name for path in made if path is not None]


def build_report(
    group: str,
    runs: list[Run],
    incomplete: list[Incomplete],
    out: Path,
    draw: bool = True,
    optimiser: dict[int, Agreement] | None = None,
) -> dict:
    """Write report.html, report.md, report.json and (with `draw`) figures/ into `out`; return the JSON.
    `optimiser`: each claim's agreement across learning rates, when a tuned sweep holds this group."""
    out.mkdir(parents=True, exist_ok=True)
    values = seed_values(runs)
    arms = arms_of(runs)
    reference = REFERENCE if REFERENCE in values else (arms[0] if arms else REFERENCE)
    metrics = table_metrics(values)
    schedule, variance = schedule_of(runs)
    weights = arm_weights(schedule, variance, arms)
    budgets = budget_values(runs)
    margins, conflicts = group_margins(runs)
    setting = Setting(schedule, variance, margins, tuple(conflicts))
    plumbing = any(run.profile == SMOKE for run in runs)
    claims = [] if plumbing else build_claims(values, final_metric_set(values), setting, budgets)
    along = {} if plumbing else verdicts_along(budgets, setting)
    statuses = {c.number: claim_status(c, along, budgets) for c in claims}
    if claims:
        curves = seed_curves(runs, EPS_MSE_BY_T)
        checks = [weight_error_check(curves, weights, arm, reference) for arm in arms if arm != reference]
        claims[3].facts += [f"check: {line}" for line in checks if line]
    comparison, table = comparison_section(values, arms, metrics, reference)
    steps = sorted({run.steps for run in runs})
    seeds = sorted({run.seed for run in runs})
    overview = Section("Verdicts", "verdicts")
    if plumbing:
        overview.paragraphs.append(
            f"{PLUMBING}. The smoke profile checks that every stage runs; its numbers mean nothing, "
            "so this report states no verdict. Run the default or full profile for evidence."
        )
    else:
        overview.paragraphs.append(
            f"At {'/'.join(map(str, steps))} training steps: {len(runs)} runs of {len(arms)} arms, seeds "
            f"{', '.join(map(str, seeds))}, paired by seed. Directional tests are one-sided at α = 0.05 with "
            "Holm's correction over the parts each claim tests; a head without the arms a claim compares is "
            "named, not counted against it. Equivalence is TOST against the margins the runs declared. "
            f"Reference of the comparison table: `{reference}`."
        )
        for claim in claims:
            status = statuses.get(claim.number)
            line = f"**Claim {claim.number}** — {claim.title}: **{claim.headline}**"
            agreement = (optimiser or {}).get(claim.number)
            if agreement is not None and not agreement.agrees:
                line += f" — provisional: {agreement.text}"
                line += f"; along the budget: {status.summary}" if status is not None else ""
            elif status is not None:
                line += f" — {status.summary}"
                line += f"; {agreement.text}" if agreement is not None and agreement.agrees else ""
            overview.bullets.append(line)
    sections = [overview, comparison]
    if not plumbing:
        sections += [Section("Claims", "claims"), *(claim_section(c, statuses.get(c.number)) for c in claims)]
    if budgets:
        sections.append(budget_section(budgets, arms, claims, statuses))
    sections += [
        s
        for s in (
            baselines_section(runs),
            optimisation_section(runs, arms),
            noise_section(runs, arms),
            bands_section(runs, arms, reference, schedule),
        )
        if s is not None
    ]
    sections.append(settings_section(runs))
    problems = (
        [
            {"directory": str(i.directory), "reason": i.reason, "arm": i.arm, "seed": i.seed}
            for i in incomplete
        ]
        + [
            {
                "directory": where(r),
                "reason": "used, but these values are not finite numbers and were left out: "
                + ", ".join(r.dropped),
                "arm": r.arm.label,
                "seed": r.seed,
            }
            for r in runs
            if r.dropped
        ]
        + [{"directory": "(group)", "reason": c, "arm": "?", "seed": "?"} for c in conflicts]
    )
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
    made = make_figures(runs, arms, weights, schedule, budgets, values, out) if runs and draw else []
    payload = {
        "group": group,
        "plumbing": plumbing,
        "reference": reference.label,
        "steps": steps,
        "seeds": seeds,
        "metrics": {m: info.label for m in metrics if (info := metric_info(m))},
        "table": table,
        "claims": claims_json(claims, statuses, optimiser or {}),
        "runs": len(runs),
        "incomplete": problems,
        "figures": made,
    }
    title = f"diffbench report: {group}"
    atomic.write_text(out / REPORT_JSON, json.dumps(payload, indent=2, default=str) + "\n")
    atomic.write_text(out / REPORT_MD, markdown(title, sections, made))
    atomic.write_text(out / REPORT_HTML, html_page(title, sections, made, out))
    return payload


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
