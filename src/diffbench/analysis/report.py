"""The report of one group of comparable runs: the comparison table (Δ to the reference with
t-intervals, every seed, the smallest detectable effect), the claims and their verdicts at the
final budget and along the budget, baselines, optimisation diagnostics, where in log SNR the
NLL is lost, and figures, as report.json, report.md, report.html and figures/."""

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
    PLUMBING,
    Claim,
    all_claims,
    budget_verdicts,
    present,
    summary_line,
    verdict_changed,
)
from diffbench.analysis.collect import (
    ARM_PARTS,
    REFERENCE,
    Incomplete,
    Run,
    budget_values,
    comparable_settings,
    seed_curves,
    seed_values,
)
from diffbench.analysis.inference import Comparison, compare
from diffbench.analysis.render import Section, Table, html_page, markdown
from diffbench.core.diffusion import NoiseSchedule, snr
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.rundir import (
    EPS_MSE_BY_T,
    EPS_STAR_DISTANCE,
    METRIC_INFO,
    NOT_RANKED,
    QUALITY_METRICS,
    TABLE_METRICS,
    VLB_TERMS,
    X0_TRAJECTORY,
    flat,
    sample_grid,
)
from diffbench.sampling.nll import stratified_weights

REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
SMOKE = "smoke"
FLAT_THRESHOLD = 0.05
"""A curve has flattened when its mean changed by less than this fraction over the last doubling."""
LOG_SNR_BANDS = ((4.0, math.inf), (0.0, 4.0), (-4.0, 0.0), (-math.inf, -4.0))
"""log-SNR bands of the NLL split, from nearly clean to nearly pure noise."""


def schedule_of(runs: list[Run]) -> tuple[NoiseSchedule, str]:
    """The diffusion schedule these runs were trained with (the package defaults if unrecorded)."""
    diffusion = next((r.config.get("diffusion") for r in runs if r.config.get("diffusion")), {})
    schedule = NoiseSchedule(diffusion.get("schedule", "linear"), int(diffusion.get("num_timesteps", 1000)))
    return schedule, diffusion.get("variance", "small")


def arms_of(runs: list[Run]) -> list[str]:
    """The arms present, in display order (by head, then weighting)."""
    present_arms = {run.arm for run in runs}
    return [arm for arm in ARM_PARTS if arm in present_arms] + sorted(present_arms - set(ARM_PARTS))


def arm_weights(schedule: NoiseSchedule, variance: str, arms: list[str]) -> dict[str, np.ndarray]:
    """Each arm's w_ε(t) on t = 2..T, from its weighting object (never from its name)."""
    steps = torch.arange(2, schedule.num_timesteps + 1)
    weights = {}
    for arm in arms:
        if arm in ARM_PARTS:
            head, weighting = ARM_PARTS[arm]
            weights[arm] = WEIGHTINGS[weighting].eps_weight(HEADS[head], schedule, steps, variance).numpy()  # type: ignore[arg-type]
    return weights


def fmt(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4g}"


def delta_text(c: Comparison) -> str:
    """Δ with its 95% paired t-interval, relative Δ, n and the smallest effect this n detects."""
    if c.n == 0:
        return "—"
    interval = "" if c.interval is None else f" [{fmt(c.interval[0])}, {fmt(c.interval[1])}]"
    relative = "" if c.relative is None else f" ({100 * c.relative:+.1f}%)"
    mde = "" if c.mde is None else f", MDE {fmt(c.mde)}"
    return f"Δ {fmt(c.mean)}{interval}{relative}, n={c.n}{mde}"


def seeds_text(points: dict[int, float]) -> str:
    return ", ".join(f"s{seed}: {fmt(value)}" for seed, value in sorted(points.items()))


def value_text(points: dict[int, float]) -> str:
    array = np.array(list(points.values()))
    if not len(array):
        return "—"
    spread = f" ± {fmt(float(array.std(ddof=1)))}" if len(array) > 1 else ""
    return f"{fmt(float(array.mean()))}{spread} (n={len(array)})"


def comparison_section(
    values: dict, arms: list[str], metrics: list[str], reference: str
) -> tuple[Section, dict]:
    """Mean ± sd over seeds per arm and metric, every seed, and the seed-paired Δ to the reference."""
    rows, payload = [], {}
    for arm in arms:
        payload[arm] = {}
        cells = [arm]
        for metric in metrics:
            points = values.get(arm, {}).get(metric, {})
            text = value_text(points)
            entry = {"seeds": points}
            if arm != reference and points:
                c = compare(f"{arm} − {reference}", metric, points, values.get(reference, {}).get(metric, {}))
                text += "\n" + delta_text(c)
                entry["delta"] = comparison_json(c)
            cells.append(text)
            payload[arm][metric] = entry
        rows.append(cells)
    section = Section(
        "Comparison",
        "comparison",
        [
            f"Mean ± sd over seeds; second line: the seed-paired difference to `{reference}` with its 95% "
            "paired t-interval, relative Δ and the minimum effect this n detects with 80% power "
            f"(one-sided α = 0.05). Lower is better except {', '.join(NOT_RANKED)}.",
        ],
        [Table(["arm", *metrics], rows)],
    )
    section.tables.append(
        Table(
            ["arm", "metric", "every seed"],
            [
                [arm, m, seeds_text(values[arm][m])]
                for arm in arms
                for m in metrics
                if values.get(arm, {}).get(m)
            ],
        )
    )
    return section, payload


def comparison_json(c: Comparison) -> dict:
    return {
        "label": c.label,
        "metric": c.metric,
        "n": c.n,
        "mean": c.mean,
        "relative": c.relative,
        "interval": c.interval,
        "p_less": c.p_less,
        "p_greater": c.p_greater,
        "permutation_p_less": c.perm_p_less,
        "permutation_p_greater": c.perm_p_greater,
        "bootstrap": c.bootstrap,
        "mde": c.mde,
        "differences": c.differences,
    }


def claim_sections(claims: list[Claim]) -> list[Section]:
    sections = []
    for claim in claims:
        section = Section(f"Claim {claim.number}: {claim.title}", f"claim{claim.number}", level=3)
        section.paragraphs.append(claim.verdict)
        section.paragraphs.append(f"Source: {claim.source}.")
        section.bullets += claim.facts
        rows = []
        for test in claim.tests:
            rule = (
                f"one-sided, Δ {'<' if test.expect == 'negative' else '>'} 0, Holm"
                if test.kind == "directional"
                else f"TOST, margin ±{fmt(test.margin)}"
            )
            role = "primary" if test.primary else "secondary"
            for c, verdict in zip(test.comparisons, test.part_verdicts):
                p = c.p_value(test.expect) if test.expect else None
                rows.append(
                    [f"{test.title} ({role})", test.metric, rule, c.label, delta_text(c), fmt(p), verdict]
                )
            rows.append([f"{test.title} ({role})", test.metric, rule, "all parts", "", "", test.verdict])
        if rows:
            section.tables.append(Table(["test", "metric", "rule", "comparison", "Δ", "p", "verdict"], rows))
        sections.append(section)
    return sections


def claims_json(claims: list[Claim]) -> list[dict]:
    return [
        {
            "number": claim.number,
            "title": claim.title,
            "source": claim.source,
            "verdict": claim.verdict,
            "facts": claim.facts,
            "tests": [
                {
                    "title": t.title,
                    "metric": t.metric,
                    "kind": t.kind,
                    "primary": t.primary,
                    "expect": t.expect,
                    "margin": t.margin,
                    "verdict": t.verdict,
                    "parts": [
                        {**comparison_json(c), "verdict": v} for c, v in zip(t.comparisons, t.part_verdicts)
                    ],
                }
                for t in claim.tests
            ],
        }
        for claim in claims
    ]


def flattened(budgets: dict[int, dict], arm: str, metric: str) -> str:
    """'flat' when the seed mean moved by less than FLAT_THRESHOLD over the last two budgets."""
    steps = [s for s in sorted(budgets) if budgets[s].get(arm, {}).get(metric)]
    if len(steps) < 2:
        return "—"
    last, previous = (np.mean(list(budgets[s][arm][metric].values())) for s in steps[-2:][::-1])
    change = abs(last - previous) / max(abs(previous), 1e-12)
    return f"{'flat' if change < FLAT_THRESHOLD else 'moving'} ({100 * change:.1f}%)"


def budget_section(budgets: dict[int, dict], arms: list[str], verdicts: dict | None) -> Section:
    section = Section("Along the training budget", "budgets")
    section.paragraphs.append(
        "Cheap metrics measured during training at each budget (same seeded noise at every budget): "
        "mean over seeds. A curve is flat when its mean moved by less than "
        f"{100 * FLAT_THRESHOLD:.0f}% between the last two budgets."
    )
    steps = sorted(budgets)
    metrics = sorted({m for step in steps for arm in budgets[step].values() for m in arm})
    for metric in metrics:
        rows = []
        for arm in arms:
            cells = [arm]
            for step in steps:
                points = budgets[step].get(arm, {}).get(metric, {})
                cells.append(fmt(float(np.mean(list(points.values())))) if points else "—")
            rows.append([*cells, flattened(budgets, arm, metric)])
        section.tables.append(Table([metric, *map(str, steps), "last doubling"], rows))
    if verdicts:
        changed = verdict_changed(verdicts)
        rows = [[str(step), *(verdicts[step].get(c, "—") for c in ("1", "2"))] for step in sorted(verdicts)]
        section.tables.append(Table(["steps", "claim 1 (val VLB)", "claim 2 (small-sample FD)"], rows))
        for claim, flag in changed.items():
            if flag:
                section.paragraphs.append(f"Claim {claim}'s verdict changed between the last two budgets.")
    return section


def baselines_section(runs: list[Run]) -> Section | None:
    """What a number should be read against: a trivial model's NLL and the real-vs-real floor."""
    found: dict[str, dict[int, float]] = {}
    for run in runs:
        for key, value in (run.evaluation.get("baselines") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found.setdefault(key, {})[run.seed] = float(value)
    if not found:
        return None
    rows = [[key, value_text(points)] for key, points in sorted(found.items())]
    return Section(
        "Baselines",
        "baselines",
        [
            "histogram_nll_bpd: every pixel an independent histogram over the data's levels, fit on the "
            "train split and scored on the test split (a trivial model every NLL should beat); "
            "*_real_vs_real: the sample metric between real train and real test images (the floor of "
            "the feature distance at this sample count)."
        ],
        [Table(["baseline", "value over seeds"], rows)],
    )


def optimisation_section(runs: list[Run], arms: list[str]) -> Section | None:
    keys = ("gradient_clip_val", "clipped_fraction", "grad_norm_median", "grad_norm_max")
    rows = []
    for arm in arms:
        records = [r.optimisation for r in runs if r.arm == arm and r.optimisation]
        if not records:
            continue
        cells = [arm]
        for key in keys:
            numbers = [r[key] for r in records if isinstance(r.get(key), (int, float))]
            cells.append(
                fmt(float(np.mean(numbers))) if numbers else "off" if key == "gradient_clip_val" else "—"
            )
        rows.append(cells)
    if not rows:
        return None
    return Section(
        "Optimisation",
        "optimisation",
        [
            "Gradient norms before clipping, mean over seeds. A clipping threshold that bites one arm "
            "and not another changes what that arm descends: compare clipped fractions."
        ],
        [Table(["arm", *keys], rows)],
    )


def noise_section(runs: list[Run], arms: list[str]) -> Section | None:
    """Evaluation noise beside seed noise: the same model scored on two independent halves of its
    samples moves a sample metric by |a − b|; the seeds move it by their standard deviation."""
    rows = []
    for arm in arms:
        arm_runs = [r for r in runs if r.arm == arm]
        records = [
            (r, r.evaluation.get("sample_settings", {}).get("evaluation_noise") or {}) for r in arm_runs
        ]
        names = sorted(
            {k for _, rec in records for k, v in rec.items() if isinstance(v, list) and "_std" not in k}
        )
        for name in names:
            gaps = [abs(rec[name][0] - rec[name][1]) for _, rec in records if len(rec.get(name, [])) == 2]
            full = [r.metrics[name] for r, _ in records if name in r.metrics]
            sizes = sorted({rec.get("half_size") for _, rec in records if name in rec})
            spread = fmt(float(np.std(full, ddof=1))) if len(full) >= 2 else "—"
            rows.append(
                [arm, name, "/".join(map(str, sizes)), fmt(float(np.mean(gaps))), spread, str(len(gaps))]
            )
    if not rows:
        return None
    return Section(
        "Evaluation noise",
        "noise",
        [
            "The same model's samples split in two independent halves, each scored against the same "
            "reference: |a − b| is what the sample metric moves with the samples alone (for the whole "
            "sample set, about 0.6 · |a − b|, since a score's variance halves with twice the samples). "
            "When it is near the seed-to-seed sd, more samples, not more seeds, would sharpen the "
            "comparison."
        ],
        [
            Table(
                ["arm", "metric", "half size", "mean abs(a − b) over seeds", "seed sd (full set)", "n"], rows
            )
        ],
    )


def band_contributions(terms: tuple[list[float], list[float]], schedule: NoiseSchedule) -> list[float] | None:
    """A run's VLB split into LOG_SNR_BANDS (bits/dim): each evaluated term times the number of
    the T terms it stands for (all T, or a stratified estimate), summed per band."""
    t, value = (np.asarray(v) for v in terms)
    T = schedule.num_timesteps
    if len(t) == T:
        weight = np.ones(T)
    elif (len(t) - 1) and T % (len(t) - 1) == 0 and T // (len(t) - 1) >= 2:
        weight = stratified_weights(T, len(t) - 1).numpy()
    else:
        return None
    log_snr = snr(schedule.alphas_cumprod[np.clip(np.rint(t).astype(int), 1, T)]).log().numpy()
    return [float((weight * value)[(log_snr >= low) & (log_snr < high)].sum()) for low, high in LOG_SNR_BANDS]


def bands_section(
    runs: list[Run], arms: list[str], reference: str, schedule: NoiseSchedule
) -> Section | None:
    """Where in noise level each arm's NLL differs from the reference's, from the per-t VLB terms."""
    curves = seed_curves(runs, VLB_TERMS)
    split = {
        arm: {
            seed: bands
            for seed, c in curves.get(arm, {}).items()
            if (bands := band_contributions(c, schedule))
        }
        for arm in arms
    }
    if not split.get(reference):
        return None
    labels = [f"log SNR in [{low:g}, {high:g})" for low, high in LOG_SNR_BANDS]
    rows = []
    for arm in arms:
        if arm == reference or not split.get(arm):
            continue
        cells = [arm]
        for index in range(len(LOG_SNR_BANDS)):
            a = {s: b[index] for s, b in split[arm].items()}
            b = {s: v[index] for s, v in split[reference].items()}
            cells.append(delta_text(compare(f"{arm} − {reference}", labels[index], a, b)))
        rows.append(cells)
    if not rows:
        return None
    return Section(
        "Where the likelihood is lost",
        "bands",
        [f"Seed-paired difference to `{reference}` of the VLB's terms summed per log-SNR band (bits/dim)."],
        [Table(["arm", *labels], rows)],
    )


def flatten(value: object) -> dict[str, str]:
    """Nested settings as {dotted key: JSON value}, comparable as strings."""
    return {key: json.dumps(inner, sort_keys=True) for key, inner in flat(value).items()}


def settings_section(runs: list[Run]) -> Section:
    """Every setting behind the group (equal within a group by construction), plus each
    evaluation's recorded settings."""
    found: dict[str, set[str]] = {}
    for run in runs:
        recorded = {
            key: {
                k: v
                for k, v in (run.evaluation.get(key) or {}).items()
                if "wall_time" not in k and k not in ("nfe", "evaluation_noise")
            }
            for key in ("nll_vlb_settings", "nll_ode_settings", "sample_settings")
        }
        for key, value in {**flatten(comparable_settings(run.config)), **flatten(recorded)}.items():
            found.setdefault(key, set()).add(value)
    bullets = [f"`{key}`: " + "; ".join(sorted(values)) for key, values in sorted(found.items())]
    return Section("Settings behind the numbers", "settings", bullets=bullets)


def make_figures(
    runs: list[Run],
    arms: list[str],
    weights: dict,
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
    quality = next(iter(present(values, QUALITY_METRICS)), None)
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


def margins_of(runs: list[Run]) -> dict[str, float]:
    """Equivalence margins declared in the runs' configs (`report.margins`), before the runs."""
    margins: dict[str, float] = {}
    for run in runs:
        for key, value in ((run.config.get("report") or {}).get("margins") or {}).items():
            if isinstance(value, (int, float)):
                margins[key] = float(value)
    return margins


def build_report(group: str, runs: list[Run], incomplete: list[Incomplete], out: Path) -> dict:
    """Write report.html, report.md, report.json and figures/ into `out`; return the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    values = seed_values(runs)
    arms = arms_of(runs)
    reference = REFERENCE if REFERENCE in values else (arms[0] if arms else REFERENCE)
    metrics = present(values, TABLE_METRICS)
    schedule, variance = schedule_of(runs)
    weights = arm_weights(schedule, variance, arms)
    budgets = budget_values(runs)
    plumbing = any(run.profile == SMOKE for run in runs)
    claims = (
        []
        if plumbing
        else all_claims(
            values,
            budgets,
            schedule,
            variance,
            margins_of(runs),
            seed_curves(runs, EPS_MSE_BY_T),
            weights,
            reference,
        )
    )
    verdicts = None if plumbing else budget_verdicts(budgets)
    comparison, table = comparison_section(values, arms, metrics, reference)
    steps = sorted({run.steps for run in runs})
    overview = Section("Verdicts", "verdicts")
    if plumbing:
        overview.paragraphs.append(
            f"{PLUMBING}. The smoke profile checks that every stage runs; its numbers mean nothing, "
            "so this report states no verdict. Run the default or full profile for evidence."
        )
    else:
        overview.paragraphs.append(
            f"At {'/'.join(map(str, steps))} training steps, {len(runs)} runs, seeds paired. "
            "Directional tests are one-sided at α = 0.05, Holm-corrected within a test; "
            f"'holds' needs every head, 'not shown at this n' is not a failure. Reference: `{reference}`."
        )
        overview.bullets += [f"{summary_line(c)} — {c.title}" for c in claims]
    sections = [overview, comparison]
    if not plumbing:
        sections += [Section("Claims", "claims"), *claim_sections(claims)]
    if budgets:
        sections.append(budget_section(budgets, arms, verdicts))
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
    problems = [
        {"directory": str(i.directory), "reason": i.reason, "arm": i.arm, "seed": i.seed} for i in incomplete
    ] + [
        {
            "directory": str(r.directory or "W&B"),
            "reason": "used, but these values are not finite numbers and were left out: "
            + ", ".join(r.dropped),
            "arm": r.arm,
            "seed": r.seed,
        }
        for r in runs
        if r.dropped
    ]
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
    made = make_figures(runs, arms, weights, schedule, budgets, values, out) if runs else []
    payload = {
        "group": group,
        "plumbing": plumbing,
        "reference": reference,
        "steps": steps,
        "metrics": {m: METRIC_INFO[m].label for m in metrics},
        "table": table,
        "claims": claims_json(claims),
        "budget_verdicts": verdicts,
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
    means = {arm: float(np.mean(list(m[metric].values()))) for arm, m in values.items() if m.get(metric)}
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
