"""The report of one group of comparable runs: verdicts, the comparison table and figures, as
report.json, report.md, report.html and figures/ (rendering lives in `render`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from diffbench import atomic
from diffbench.analysis import figures
from diffbench.analysis.claims import (
    Claim,
    all_claims,
    arm_interval,
    paired_interval,
    present_metrics,
    quality_metric,
)
from diffbench.analysis.collect import (
    ARM_PARTS,
    ARMS,
    REFERENCE,
    Incomplete,
    Run,
    seed_curves,
    seed_values,
)
from diffbench.analysis.render import html_page, markdown
from diffbench.analysis.stats import Interval
from diffbench.core.diffusion import NoiseSchedule, snr
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.rundir import (
    EPS_MSE_BY_T,
    EPS_STAR_DISTANCE,
    NLL_METRICS,
    QUALITY_METRICS,
    TABLE_METRICS,
    VLB_TERMS,
    X0_TRAJECTORY,
    sample_grid,
)

#: Metrics drawn in the paired-difference figure: the claims' metrics and the validation VLB.
COMPARED = (*NLL_METRICS, *QUALITY_METRICS, "eps_star_mse", "val/vlb_bpd")
REPORT_JSON, REPORT_MD, REPORT_HTML = "report.json", "report.md", "report.html"
SETTINGS_KEYS = ("nll_vlb_settings", "nll_ode_settings", "sample_settings")


def schedule_of(runs: list[Run]) -> tuple[NoiseSchedule, str]:
    """The diffusion schedule these runs were trained with (the package defaults if unrecorded)."""
    diffusion = next((r.config.get("diffusion") for r in runs if r.config.get("diffusion")), {})
    schedule = NoiseSchedule(diffusion.get("schedule", "linear"), int(diffusion.get("num_timesteps", 1000)))
    return schedule, diffusion.get("variance", "small")


def arm_weights(schedule: NoiseSchedule, variance: str, arms: list[str]) -> dict[str, np.ndarray]:
    """Each arm's w_ε(t) on t = 2..T, from its weighting object (never from its name)."""
    steps = torch.arange(2, schedule.num_timesteps + 1)
    weights = {}
    for arm in arms:
        head, weighting = ARM_PARTS[arm]
        weights[arm] = WEIGHTINGS[weighting].eps_weight(HEADS[head], schedule, steps, variance).numpy()  # type: ignore[arg-type]
    return weights


def comparison_table(values: dict, metrics: list[str]) -> dict[str, dict[str, dict[str, Interval | None]]]:
    """{arm: {metric: {"value": interval over seeds, "diff": paired difference to eps_simple}}}."""
    table = {}
    for arm in ARM_PARTS:
        if arm not in values:
            continue
        table[arm] = {
            metric: {
                "value": arm_interval(values, arm, metric),
                "diff": None if arm == REFERENCE else paired_interval(values, arm, REFERENCE, metric),
            }
            for metric in metrics
        }
    return table


def settings_summary(runs: list[Run]) -> dict[str, list[str]]:
    """What stands behind every number: data, budget, model and each evaluation's settings,
    with every distinct value listed when runs differ."""
    found: dict[str, set[str]] = {}

    def add(key: str, value: object) -> None:
        found.setdefault(key, set()).add(
            value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        )

    for run in runs:
        config = run.config
        add("data", run.data)
        add("profile", run.profile)
        add("training steps", run.steps)
        if config:
            add("batch size", config.get("data", {}).get("batch_size"))
            add("model", config.get("model", {}).get("name"))
            add("diffusion", config.get("diffusion"))
        if not run.evaluation and config.get("eval"):
            add("evaluation config", config["eval"])
        for key in SETTINGS_KEYS:
            if key in run.evaluation:
                add(
                    key, {k: v for k, v in run.evaluation[key].items() if "wall_time" not in k and k != "nfe"}
                )
    return {key: sorted(values) for key, values in found.items()}


def interval_dict(interval: Interval | None) -> dict | None:
    if interval is None:
        return None
    return {"mean": interval.mean, "low": interval.low, "high": interval.high, "n": interval.n}


def claims_json(claims: list[Claim]) -> list[dict]:
    return [
        {
            "number": c.number,
            "title": c.title,
            "expectation": c.expectation,
            "verdict": c.verdict,
            "parts": [
                {
                    "label": p.label,
                    "metric": p.metric,
                    "verdict": p.verdict,
                    "interval": interval_dict(p.interval),
                }
                for p in c.parts
            ],
        }
        for c in claims
    ]


def make_figures(
    runs: list[Run],
    weights: dict,
    schedule: NoiseSchedule,
    table: dict,
    metrics: list[str],
    eps_curves: dict,
    out: Path,
) -> list[str]:
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    log_snr = torch.log(snr(schedule.alphas_cumprod[2:])).numpy()
    diffs = {arm: {m: row[m]["diff"] for m in metrics} for arm, row in table.items()}
    sampler = next(
        (r.evaluation.get("sample_settings", {}).get("sampler") for r in runs if r.evaluation), None
    )
    first_seed = {}
    for run in sorted(runs, key=lambda r: r.seed):
        if run.directory is not None:
            first_seed.setdefault(run.arm, run.directory)
    made = [
        figures.implied_weights(log_snr, weights, folder / "implied_weights.png"),
        figures.per_t_curves(
            seed_curves(runs, VLB_TERMS),
            folder / VLB_TERMS.png,
            "L_{t-1} (bits/dim)",
            "measured per-t VLB terms",
        ),
        figures.per_t_curves(
            eps_curves,
            folder / EPS_MSE_BY_T.png,
            "‖ε − ε̂‖² / D",
            "measured ε-space error per t",
            logx=True,
        ),
        figures.per_t_curves(
            seed_curves(runs, EPS_STAR_DISTANCE),
            folder / EPS_STAR_DISTANCE.png,
            "‖ε̂ − ε*‖² / D",
            "distance to the optimal denoiser ε* (gmm)",
        ),
        figures.paired_differences(
            diffs, [m for m in metrics if m in COMPARED], folder / "paired_differences.png"
        ),
        figures.training_curves(runs, folder / "training_curves.png"),
        figures.image_panels(
            {arm: [d / sample_grid(sampler), d / X0_TRAJECTORY] for arm, d in first_seed.items()},
            [f"samples ({sampler})", "x̂0 along a trajectory"],
            folder / "samples.png",
        ),
    ]
    return [path.name for path in made if path is not None]


def build_report(group: str, runs: list[Run], incomplete: list[Incomplete], out: Path) -> dict:
    """Write report.html, report.md, report.json and figures/ into `out`; return the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    values = seed_values(runs)
    metrics = present_metrics(values, TABLE_METRICS)
    schedule, variance = schedule_of(runs)
    weights = arm_weights(schedule, variance, sorted({*ARMS, *(r.arm for r in runs)} & set(ARM_PARTS)))
    table = comparison_table(values, metrics)
    eps_curves = seed_curves(runs, EPS_MSE_BY_T)
    claims = all_claims(values, eps_curves, weights)
    context = {
        "settings": settings_summary(runs),
        "runs": len(runs),
        "incomplete": [
            {"directory": str(i.directory), "reason": i.reason, "arm": i.arm, "seed": i.seed}
            for i in incomplete
        ]
        + [
            {
                "directory": str(r.directory or "W&B"),
                "reason": "used, but these values are not finite numbers and were left out: "
                + ", ".join(r.dropped),
                "arm": r.arm,
                "seed": r.seed,
            }
            for r in runs
            if r.dropped
        ],
        "figures": make_figures(runs, weights, schedule, table, metrics, eps_curves, out) if runs else [],
    }
    payload = {
        "group": group,
        "metrics": metrics,
        "quality_metric": quality_metric(values),
        "nll_metrics": present_metrics(values, NLL_METRICS),
        "table": {
            arm: {m: {k: interval_dict(v) for k, v in row[m].items()} for m in metrics}
            for arm, row in table.items()
        },
        "claims": claims_json(claims),
        **context,
    }
    atomic.write_text(out / REPORT_JSON, json.dumps(payload, indent=2) + "\n")
    atomic.write_text(out / REPORT_MD, markdown(group, table, metrics, claims, context))
    atomic.write_text(out / REPORT_HTML, html_page(group, table, metrics, claims, context, out))
    return payload
