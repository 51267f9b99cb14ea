"""The sweep's terminal table: arm × headline metric, mean ± spread over seeds."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from diffbench import atomic
from diffbench.rundir import COMPLETE, DIVERGED, HEADLINE_METRICS, RunDir


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(results: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{arm: {metric: {mean, spread, n}}} over the seeds present."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for result in results:
        for metric in HEADLINE_METRICS:
            if metric in result.get("metrics", {}):
                values[result["arm"]][metric].append(float(result["metrics"][metric]))
    table: dict[str, dict[str, dict[str, float]]] = {}
    for arm, metrics in values.items():
        table[arm] = {}
        for metric, vals in metrics.items():
            mean, spread = mean_and_spread(vals)
            table[arm][metric] = {"mean": mean, "spread": spread, "n": len(vals)}
    return table


def format_table(table: dict[str, dict[str, dict[str, float]]], profile: str) -> str:
    columns = [m for m in HEADLINE_METRICS if any(m in row for row in table.values())]
    header = ["arm", *columns]
    rows = [header]
    for arm in sorted(table):
        cells = [arm]
        for metric in columns:
            cell = table[arm].get(metric)
            cells.append(
                "—" if cell is None else f"{cell['mean']:.4f} ± {cell['spread']:.4f} (n={cell['n']})"
            )
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    title = f"profile {profile}: mean ± standard deviation over seeds"
    return "\n".join([title, *lines])


def summarize_trials(run_dirs: list[Path], out_stem: Path) -> str:
    """Aggregate the finished trials, write `<stem>.md` and `<stem>.json`, return the table."""
    finished = [r for r in (RunDir(d).final_results() for d in run_dirs) if r is not None]
    results = [r for r in finished if r["status"] == COMPLETE]
    diverged = [r for r in finished if r["status"] == DIVERGED]
    profiles = sorted({r.get("profile", "?") for r in results}) or ["?"]
    table = aggregate(results)
    text = format_table(table, "/".join(profiles))
    if diverged:
        text += "\ndiverged (no metrics): " + ", ".join(
            f"{r['arm']} seed {r['seed']} at step {r.get('diverged_at_step', '?')}" for r in diverged
        )
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_stem.with_suffix(".md"), text + "\n")
    payload = {
        "profiles": profiles,
        "trials": len(run_dirs),
        "complete": len(results),
        "diverged": [
            {"arm": r["arm"], "seed": r["seed"], "step": r.get("diverged_at_step")} for r in diverged
        ],
        "table": table,
    }
    atomic.write_text(out_stem.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    return text
