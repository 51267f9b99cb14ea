"""`python -m diffbench.report`: the verdict on each claim from the finished runs, as a
self-contained HTML page, a Markdown summary, PNG figures and a JSON file."""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from diffbench import figures
from diffbench.claims import (
    NLL_METRICS,
    NOT_RANKED,
    QUALITY_METRICS,
    TABLE_METRICS,
    Claim,
    all_claims,
    arm_interval,
    paired_interval,
    present_metrics,
    quality_metric,
    summary_line,
)
from diffbench.collect import (
    ARMS,
    REFERENCE,
    Incomplete,
    Run,
    by_group,
    from_wandb,
    scan,
    seed_curves,
    seed_values,
)
from diffbench.diffusion import NoiseSchedule, implied_eps_weight, snr
from diffbench.stats import Interval
from diffbench.summary import write_atomic

#: Metrics drawn in the paired-difference figure: the claims' metrics and the validation VLB.
COMPARED = (*NLL_METRICS, *QUALITY_METRICS, "eps_star_mse", "val/vlb_bpd")
RANK_NOTE = "not ranked: " + ", ".join(NOT_RANKED)
SETTINGS_KEYS = ("nll_vlb_settings", "nll_ode_settings", "sample_settings")
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #1f2328; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #d0d7de; padding: 4px 8px; font-size: 13px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.verdict { font-weight: bold; padding: 2px 8px; border-radius: 4px; color: #fff; }
.diff { color: #57606a; font-size: 12px; }
.best { font-weight: bold; background: #dafbe1; }
img { max-width: 100%; border: 1px solid #d0d7de; margin: .5em 0; }
"""
VERDICT_COLORS = {"holds": "#1a7f37", "fails": "#cf222e", "inconclusive": "#9a6700", "no data": "#6e7781"}


def schedule_of(runs: list[Run]) -> tuple[NoiseSchedule, str]:
    """The diffusion schedule these runs were trained with (the package defaults if unrecorded)."""
    diffusion = next((r.config.get("diffusion") for r in runs if r.config.get("diffusion")), {})
    schedule = NoiseSchedule(diffusion.get("schedule", "linear"), int(diffusion.get("num_timesteps", 1000)))
    return schedule, diffusion.get("variance", "small")


def arm_weights(schedule: NoiseSchedule, variance: str) -> dict[str, np.ndarray]:
    weights = {}
    for arm in ARMS:
        head, weighting = arm.split("_")
        weights[arm] = implied_eps_weight(schedule, head, weighting, variance).numpy()  # type: ignore[arg-type]
    return weights


def comparison_table(values: dict, metrics: list[str]) -> dict[str, dict[str, dict[str, Interval | None]]]:
    """{arm: {metric: {"value": interval over seeds, "diff": paired difference to eps_simple}}}."""
    table = {}
    for arm in ARMS:
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


def cell(interval: Interval | None, with_n: bool = False) -> str:
    """`mean [low, high]`; table cells add n, since a value and its paired Δ may rest on
    different seeds and a single seed's interval is no interval at all."""
    if interval is None:
        return "—"
    n = f" (n={interval.n})" if with_n else ""
    return f"{interval.mean:.4g} [{interval.low:.4g}, {interval.high:.4g}]{n}"


def best_arms(table: dict, metrics: list[str]) -> dict[str, str]:
    """The arm with the lowest mean per metric (every table metric is better when lower)."""
    best = {}
    for metric in metrics:
        if metric in NOT_RANKED:
            continue
        means = {a: row[metric]["value"].mean for a, row in table.items() if row[metric]["value"] is not None}
        finite = {a: m for a, m in means.items() if math.isfinite(m)}
        if finite:
            best[metric] = min(finite, key=finite.__getitem__)
    return best


def markdown(group: str, table: dict, metrics: list[str], claims: list[Claim], context: dict) -> str:
    best = best_arms(table, metrics)
    lines = [f"# diffbench report: {group}", ""]
    lines += [f"- **{summary_line(c)}** — {c.title}" for c in claims]
    lines += [
        "",
        "## Comparison",
        "",
        "Mean over seeds [95% bootstrap interval]; second line: paired Δ to "
        f"`{REFERENCE}` (same seed). Lower is better; **bold** = best mean ({RANK_NOTE}).",
        "",
    ]
    lines.append("| arm | " + " | ".join(f"`{m}`" for m in metrics) + " |")
    lines.append("|---" * (len(metrics) + 1) + "|")
    for arm, row in table.items():
        cells = []
        for metric in metrics:
            text = cell(row[metric]["value"], with_n=True)
            if best.get(metric) == arm:
                text = f"**{text}**"
            if row[metric]["diff"] is not None:
                text += f"<br>Δ {cell(row[metric]['diff'], with_n=True)}"
            cells.append(text)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Claims", ""]
    for claim in claims:
        lines += [
            f"### {claim.number}. {claim.title}: {claim.verdict}",
            "",
            f"Expected: {claim.expectation}.",
            "",
        ]
        lines += ["| comparison | metric | mean [95% CI] | n | verdict |", "|---|---|---|---|---|"]
        for part in claim.parts:
            n = part.interval.n if part.interval else 0
            lines.append(f"| {part.label} | `{part.metric}` | {cell(part.interval)} | {n} | {part.verdict} |")
        lines.append("")
    lines += ["## Settings behind the numbers", ""]
    lines += [
        f"- {key}: " + "; ".join(f"`{v}`" for v in values) for key, values in context["settings"].items()
    ]
    lines += ["", f"Runs used: {context['runs']}.", ""]
    if context["incomplete"]:
        lines += ["## Incomplete runs and left-out values", ""]
        lines += [
            f"- `{item['directory']}` ({item['experiment']}, seed {item['seed']}): {item['reason']}"
            for item in context["incomplete"]
        ]
        lines.append("")
    lines += ["## Figures", ""]
    lines += [f"![{name}](figures/{name})" for name in context["figures"]]
    return "\n".join(lines) + "\n"


def html_page(
    group: str, table: dict, metrics: list[str], claims: list[Claim], context: dict, out: Path
) -> str:
    """One file with everything inlined (figures as data URIs) so it can be mailed or archived."""
    esc = html.escape
    best = best_arms(table, metrics)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>diffbench report: {esc(group)}</title><style>",
        CSS,
        "</style></head><body>",
        f"<h1>diffbench report: {esc(group)}</h1>",
        "<h2>Verdicts</h2><ul>",
    ]

    def badge(verdict: str) -> str:
        return f"<span class='verdict' style='background:{VERDICT_COLORS[verdict]}'>{esc(verdict)}</span>"

    for claim in claims:
        parts.append(
            f"<li>{badge(claim.verdict)} <a href='#claim{claim.number}'>{esc(summary_line(claim))}</a>: "
            f"{esc(claim.title)}</li>"
        )
    parts += [
        "</ul><h2>Comparison</h2>",
        f"<p>Mean over seeds [95% bootstrap interval]; grey: seed-paired difference to {REFERENCE}. "
        f"Lower is better; green: best mean ({RANK_NOTE}).</p><table><tr><th>arm</th>",
    ]
    parts += [f"<th>{esc(m)}</th>" for m in metrics]
    parts.append("</tr>")
    for arm, row in table.items():
        parts.append(f"<tr><td>{esc(arm)}</td>")
        for metric in metrics:
            klass = " class='best'" if best.get(metric) == arm else ""
            diff = row[metric]["diff"]
            extra = f"<br><span class='diff'>Δ {esc(cell(diff, True))}</span>" if diff is not None else ""
            parts.append(f"<td{klass}>{esc(cell(row[metric]['value'], True))}{extra}</td>")
        parts.append("</tr>")
    parts.append("</table><h2>Claims</h2>")
    for claim in claims:
        parts.append(
            f"<h3 id='claim{claim.number}'>{claim.number}. {esc(claim.title)} {badge(claim.verdict)}</h3>"
        )
        parts.append(
            f"<p>Expected: {esc(claim.expectation)}.</p><table><tr><th>comparison</th><th>metric</th>"
            "<th>mean [95% CI]</th><th>n</th><th>verdict</th></tr>"
        )
        for part in claim.parts:
            n = part.interval.n if part.interval else 0
            parts.append(
                f"<tr><td>{esc(part.label)}</td><td>{esc(part.metric)}</td><td>{esc(cell(part.interval))}"
                f"</td><td>{n}</td><td>{badge(part.verdict)}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Settings behind the numbers</h2><ul>")
    for key, values in context["settings"].items():
        parts.append(
            f"<li><b>{esc(key)}</b>: " + "; ".join(f"<code>{esc(v)}</code>" for v in values) + "</li>"
        )
    parts.append(f"</ul><p>Runs used: {context['runs']}.</p>")
    if context["incomplete"]:
        parts.append("<h2 id='incomplete'>Incomplete runs and left-out values</h2><ul>")
        parts += [
            f"<li><code>{esc(item['directory'])}</code> ({esc(str(item['experiment']))}, seed "
            f"{esc(str(item['seed']))}): {esc(item['reason'])}</li>"
            for item in context["incomplete"]
        ]
        parts.append("</ul>")
    parts.append("<h2>Figures</h2>")
    for name in context["figures"]:
        data = base64.b64encode((out / "figures" / name).read_bytes()).decode()
        parts.append(
            f"<figure><img alt='figures/{esc(name)}' data-file='figures/{esc(name)}' "
            f"src='data:image/png;base64,{data}'><figcaption>figures/{esc(name)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


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
            first_seed.setdefault(run.experiment, run.directory)
    made = [
        figures.implied_weights(log_snr, weights, folder / "implied_weights.png"),
        figures.per_t_curves(
            seed_curves(runs, "vlb_terms.csv"),
            folder / "vlb_terms.png",
            "L_{t-1} (bits/dim)",
            "measured per-t VLB terms",
        ),
        figures.per_t_curves(
            eps_curves,
            folder / "eps_mse_by_t.png",
            "‖ε − ε̂‖² / D",
            "measured ε-space error per t",
            logx=True,
        ),
        figures.per_t_curves(
            seed_curves(runs, "eps_star_distance.csv"),
            folder / "eps_star_distance.png",
            "‖ε̂ − ε*‖² / D",
            "distance to the optimal denoiser ε* (gmm)",
        ),
        figures.paired_differences(
            diffs, [m for m in metrics if m in COMPARED], folder / "paired_differences.png"
        ),
        figures.training_curves(runs, folder / "training_curves.png"),
        figures.image_panels(
            {arm: [d / f"samples_{sampler}.png", d / "x0_trajectory.png"] for arm, d in first_seed.items()},
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
    weights = arm_weights(schedule, variance)
    table = comparison_table(values, metrics)
    eps_curves = seed_curves(runs, "eps_mse_by_t.csv")
    claims = all_claims(values, eps_curves, weights)
    context = {
        "settings": settings_summary(runs),
        "runs": len(runs),
        "incomplete": [
            {"directory": str(i.directory), "reason": i.reason, "experiment": i.experiment, "seed": i.seed}
            for i in incomplete
        ]
        + [
            {
                "directory": str(r.directory or "W&B"),
                "reason": "used, but these values are not finite numbers and were left out: "
                + ", ".join(r.dropped),
                "experiment": r.experiment,
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
    write_atomic(out / "report.json", json.dumps(payload, indent=2) + "\n")
    write_atomic(out / "report.md", markdown(group, table, metrics, claims, context))
    write_atomic(out / "report.html", html_page(group, table, metrics, claims, context, out))
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbench.report", description=__doc__)
    parser.add_argument("--runs", default="runs", help="folder searched for run directories (default: runs)")
    parser.add_argument("--out", default=None, help="where reports go (default: <runs>/report)")
    parser.add_argument("--wandb", default=None, metavar="ENTITY/PROJECT", help="read finished runs from W&B")
    options = parser.parse_args(argv)
    root = Path(options.runs)
    out = Path(options.out) if options.out else root / "report"
    if options.wandb:
        runs, incomplete = from_wandb(options.wandb)
    elif not root.is_dir():
        print(
            f"diffbench.report: no run folder {root}/. Train first (make sweep OBJ=all or "
            "python -m diffbench.run experiment=eps_simple), or point --runs at a folder of runs.",
            file=sys.stderr,
        )
        return 2
    else:
        runs, incomplete = scan(root)
    groups = by_group(runs, incomplete)
    if not groups:
        print(
            f"diffbench.report: found no run directories under {root}/ (a run directory holds "
            "config.yaml and, once finished, results.json). Train first with make sweep OBJ=all.",
            file=sys.stderr,
        )
        return 2
    for group, (group_runs, group_incomplete) in sorted(groups.items()):
        payload = build_report(group, group_runs, group_incomplete, out / group)
        print(f"[report] {group}: {len(group_runs)} finished runs, {len(group_incomplete)} incomplete")
        for claim in payload["claims"]:
            print(f"[report]   claim {claim['number']}: {claim['verdict']:<12} {claim['title']}")
        print(f"[report]   {out / group / 'report.html'} (and report.md, report.json, figures/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
