"""The sweep's terminal table: arm × headline metric, mean ± spread over seeds."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from diffbench import atomic
from diffbench.analysis.collect import Incomplete, Run, deduplicate, load_run
from diffbench.rundir import HEADLINE_METRICS


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(runs: list[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """{arm: {metric: {mean, spread, n}}} over the seeds present (finite values only)."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for metric in HEADLINE_METRICS:
            if metric in run.metrics:
                values[run.arm.label][metric].append(run.metrics[metric])
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
    """Aggregate the finished trials through the report's own collection (finite metrics only,
    duplicates counted once), write `<stem>.md` and `<stem>.json`, return the table."""
    loaded = [load_run(d) for d in run_dirs]
    runs, duplicates = deduplicate([r for r in loaded if isinstance(r, Run)])
    diverged = [r for r in loaded if isinstance(r, Incomplete) and r.diverged]
    left_out = [(r.arm.label, r.seed, name) for r in runs for name in r.dropped if name in HEADLINE_METRICS]
    profiles = sorted({r.profile for r in runs}) or ["?"]
    table = aggregate(runs)
    text = format_table(table, "/".join(profiles))
    if diverged:
        text += "\ndiverged (no metrics): " + ", ".join(
            f"{r.label} seed {r.seed} at step {r.diverged_at if r.diverged_at is not None else '?'}"
            for r in diverged
        )
    if left_out:
        text += "\nnot finite, left out: " + ", ".join(f"{a} seed {s} {m}" for a, s, m in left_out)
    if duplicates:
        text += "\n" + "\n".join(f"{d.directory}: {d.reason}" for d in duplicates)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out_stem.with_suffix(".md"), text + "\n")
    payload = {
        "profiles": profiles,
        "trials": len(run_dirs),
        "complete": len(runs),
        "diverged": [{"arm": r.label, "seed": r.seed, "step": r.diverged_at} for r in diverged],
        "left_out": [{"arm": a, "seed": s, "metric": m} for a, s, m in left_out],
        "table": table,
    }
    atomic.write_text(out_stem.with_suffix(".json"), json.dumps(payload, indent=2) + "\n")
    return text
