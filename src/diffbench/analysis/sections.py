"""The report's descriptive sections: what was measured, per arm and seed, and what to read it
against (the comparison table, baselines, optimisation, evaluation noise, where in log SNR the
likelihood goes, the settings). The verdicts are built in `analysis.report`."""

from __future__ import annotations

import json
import math

import numpy as np

from diffbench.analysis.collect import Run, comparable_settings, seed_curves
from diffbench.analysis.inference import Comparison, compare
from diffbench.analysis.render import Section, Table
from diffbench.core.arms import Arm
from diffbench.core.diffusion import NoiseSchedule, snr
from diffbench.rundir import AT, NOT_RANKED, VLB_TERMS, flat
from diffbench.sampling.nll import stratified_weights

LOG_SNR_BANDS = ((4.0, math.inf), (0.0, 4.0), (-4.0, 0.0), (-math.inf, -4.0))
"""log-SNR bands of the NLL split, from nearly clean to nearly pure noise."""


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


def p_text(c: Comparison, p: float | None) -> str:
    """A p-value and, where it is not the t-test's, which test gave it and why."""
    if p is None:
        return "—"
    if c.no_spread:
        return f"{fmt(p)} (exact sign-flip: the {c.n} differences have no spread)"
    return f"{fmt(p)} (exact sign-flip)" if c.perm_p_less is not None else fmt(p)


def seeds_text(points: dict[int, float]) -> str:
    return ", ".join(f"s{seed}: {fmt(value)}" for seed, value in sorted(points.items()))


def value_text(points: dict[int, float]) -> str:
    array = np.array(list(points.values()))
    if not len(array):
        return "—"
    spread = f" ± {fmt(float(array.std(ddof=1)))}" if len(array) > 1 else ""
    return f"{fmt(float(array.mean()))}{spread} (n={len(array)})"


def comparison_section(
    values: dict[Arm, dict[str, dict[int, float]]], arms: list[Arm], metrics: list[str], reference: Arm
) -> tuple[Section, dict]:
    """Mean ± sd over seeds per arm and metric and the seed-paired Δ to the reference (the sample
    metrics of further samplers in a table of their own), then every seed's value."""
    payload: dict[str, dict] = {arm.label: {} for arm in arms}

    def table(columns: list[str]) -> Table:
        rows = []
        for arm in arms:
            cells = [arm.label]
            for metric in columns:
                points = values.get(arm, {}).get(metric, {})
                text = value_text(points)
                entry: dict = {"seeds": points}
                if arm != reference and points:
                    c = compare(
                        f"{arm} − {reference}", metric, points, values.get(reference, {}).get(metric, {})
                    )
                    text += "\n" + delta_text(c)
                    entry["delta"] = comparison_json(c)
                cells.append(text)
                payload[arm.label][metric] = entry
            rows.append(cells)
        return Table(["arm", *columns], rows)

    main = [m for m in metrics if AT not in m]
    samplers = [m for m in metrics if AT in m]
    section = Section(
        "Comparison",
        "comparison",
        [
            f"Mean ± sd over seeds; second line: the seed-paired difference to `{reference}` with its 95% "
            "paired t-interval, relative Δ and the minimum effect this n detects with 80% power "
            f"(one-sided α = 0.05). Lower is better except {', '.join(NOT_RANKED)}.",
        ],
        [table(main)],
    )
    if samplers:
        section.paragraphs.append(
            f"The second table gives the sample metrics again on samples drawn with other samplers "
            f"(`<metric>{AT}<sampler>-<steps>`, `eval.also_samplers`), from the same seeded noise."
        )
        section.tables.append(table(samplers))
    section.tables.append(
        Table(
            ["arm", "metric", "every seed"],
            [
                [arm.label, m, seeds_text(values[arm][m])]
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
        "no_spread": c.no_spread,
        "differences": c.differences,
    }


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


def optimisation_section(runs: list[Run], arms: list[Arm]) -> Section | None:
    keys = ("gradient_clip_val", "clipped_fraction", "grad_norm_median", "grad_norm_max")
    rows = []
    for arm in arms:
        records = [r.optimisation for r in runs if r.arm == arm and r.optimisation]
        if not records:
            continue
        cells = [arm.label]
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


def noise_section(runs: list[Run], arms: list[Arm]) -> Section | None:
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
                [
                    arm.label,
                    name,
                    "/".join(map(str, sizes)),
                    fmt(float(np.mean(gaps))),
                    spread,
                    str(len(gaps)),
                ]
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
    runs: list[Run], arms: list[Arm], reference: Arm, schedule: NoiseSchedule
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
        cells = [arm.label]
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
            for key in run.evaluation
            if "settings" in key
        }
        for key, value in {**flatten(comparable_settings(run.config)), **flatten(recorded)}.items():
            found.setdefault(key, set()).add(value)
    bullets = [f"`{key}`: " + "; ".join(sorted(values)) for key, values in sorted(found.items())]
    return Section("Settings behind the numbers", "settings", bullets=bullets)
