"""Finished and unfinished runs found on disk (or in W&B), grouped into comparable sets."""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from diffbench.core.arms import Arm
from diffbench.core.heads import HEADS as HEAD_REGISTRY
from diffbench.core.weightings import WEIGHTINGS
from diffbench.rundir import (
    CHECKPOINTS,
    COMPLETE,
    CONFIG,
    DIVERGED,
    RESULTS,
    Curve,
    RunDir,
    upgrade,
)

HEADS = ("eps", "x0", "score")
"""The heads of the six original arms, which the claims compare."""
ARMS = tuple(Arm(head, weighting).label for head in HEADS for weighting in ("own", "elbo"))
"""The six original arms, in table order."""
ARM_PARTS = {
    Arm(head, weighting).label: (head, weighting) for head in HEAD_REGISTRY for weighting in WEIGHTINGS
}
"""Every arm the grid can make, in display order (by head, then weighting), with its parts."""
REFERENCE = Arm("eps", "own").label


@dataclass
class Run:
    """One finished trial: its arm, headline metrics and where its curves and images are."""

    arm: str
    seed: int
    group: str
    metrics: dict[str, float]
    head: str = "?"
    weighting: str = "?"
    data: str = "?"
    profile: str = "?"
    steps: int = 0
    evaluation: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    directory: Path | None = None
    dropped: list[str] = field(default_factory=list)
    created: float = 0.0
    budgets: list[dict] = field(default_factory=list)
    optimisation: dict = field(default_factory=dict)
    status: str = COMPLETE


@dataclass
class Incomplete:
    """A run (directory or W&B run) without usable results, and why."""

    directory: Path | str
    reason: str
    arm: str = "?"
    seed: int | str = "?"
    group: str | None = None


ARM_KEYS = ("seed", "experiment", "arm", "run", "wandb", "report")
"""Config keys that may differ between runs of one group: the arm, the seed, where a run is
written or logged, and the report's margins. Everything else (learning rate, clipping, EMA,
batch, model, budget, diffusion, evaluation) splits groups."""


def comparable_settings(config: dict) -> dict:
    """The config without what may differ within a group (and without the arm's objective)."""
    settings = {k: v for k, v in config.items() if k not in ARM_KEYS}
    objective = {
        k: v for k, v in (settings.get("objective") or {}).items() if k not in ("head", "weighting", "name")
    }
    return {**settings, "objective": objective}


def config_group(config: dict) -> str | None:
    """`<profile>-<data>-<steps>steps-<hash>`: runs are pooled only when their configs differ in
    head, weighting and seed alone (the hash covers every other setting). None if it cannot say."""
    try:
        settings = comparable_settings(config)
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:6]
        steps = int(config["trainer"]["max_steps"])
        return f"{config['profile']}-{config['data']['name']}-{steps}steps-{digest}"
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def finite_metrics(raw: object) -> tuple[dict[str, float], list[str]]:
    """Numeric, finite metrics, and the names of those left out (NaN, ±inf, not a number), so a
    diverged arm shows as missing data instead of poisoning an interval."""
    kept, dropped = {}, []
    for key, value in (raw or {}).items() if isinstance(raw, dict) else []:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            kept[key] = float(value)
        else:
            dropped.append(key)
    return kept, dropped


def arm_of(config: dict, fallback: str) -> str:
    """The arm a config trained: derived from its head and weighting, never parsed from a name."""
    objective = config.get("objective") or {}
    if "head" in objective and "weighting" in objective:
        return upgrade({"head": objective["head"], "weighting": objective["weighting"]})["arm"]
    return fallback


def load_run(directory: Path) -> Run | Incomplete:
    """A run directory as a Run, or as an Incomplete that says what is missing. Where
    results.json lacks a field (a run evaluated again by `diffbench.evaluate`), config.yaml says."""
    run_dir = RunDir(directory)
    config = run_dir.read_config() or {}
    arm = arm_of(config, directory.parent.name)
    seed = config.get("seed", "?")
    group = config_group(config)
    if not (run_dir / RESULTS).is_file():
        reason = f"no {RESULTS} (unfinished, interrupted or failed)"
        return Incomplete(directory, reason, arm, seed, group)
    results = run_dir.read_results()
    if results is None:
        return Incomplete(directory, f"{RESULTS} unreadable", arm, seed, group)
    if results.get("status") == DIVERGED:
        reason = (
            f"diverged at step {results.get('diverged_at_step', '?')} (non-finite training loss): no metrics"
        )
        return Incomplete(directory, reason, results.get("arm", arm), seed, group)
    if results.get("status") != COMPLETE:
        return Incomplete(directory, f"{RESULTS} not marked complete", arm, seed, group)
    arm = results.get("arm", arm)
    metrics, dropped = finite_metrics(results.get("metrics"))
    try:
        seed = int(results.get("seed", seed))
    except (TypeError, ValueError):
        return Incomplete(directory, f"{RESULTS} has no usable seed", arm, seed, group)
    if not metrics or group is None:
        reason = f"{RESULTS} has no metrics" if not metrics else "config.yaml missing or incomplete"
        return Incomplete(directory, reason, arm, seed, group)
    return Run(
        arm=arm,
        seed=seed,
        group=group,
        metrics=metrics,
        head=results.get("head", "?"),
        weighting=results.get("weighting", "?"),
        data=config["data"]["name"],
        profile=config["profile"],
        steps=int(results.get("steps", config["trainer"]["max_steps"])),
        evaluation=results.get("evaluation", {}) if isinstance(results.get("evaluation"), dict) else {},
        config=config,
        directory=directory,
        dropped=dropped,
        created=(directory / RESULTS).stat().st_mtime,
        budgets=[row for row in results.get("budgets") or [] if isinstance(row, dict) and "step" in row],
        optimisation=results.get("optimisation") or {},
    )


def newest(runs: list[Run]) -> list[Run]:
    """Of several finished runs of one arm and seed in a group, the newest wins."""
    chosen: dict[tuple[str, str, int], Run] = {}
    for run in runs:
        key = (run.group, run.arm, run.seed)
        if key not in chosen or chosen[key].created < run.created:
            chosen[key] = run
    return list(chosen.values())


def scan(root: Path) -> tuple[list[Run], list[Incomplete]]:
    """Every run directory under `root` (a folder holding config.yaml, W&B's own copies aside)."""
    runs, incomplete = [], []
    for config in sorted(root.rglob(CONFIG)):
        directory = config.parent
        if "wandb" in directory.parts or CHECKPOINTS in directory.parts:
            continue
        loaded = load_run(directory)
        (incomplete if isinstance(loaded, Incomplete) else runs).append(loaded)
    return newest(runs), incomplete


def from_wandb(path: str, api: object | None = None) -> tuple[list[Run], list[Incomplete]]:
    """Runs of a W&B project `entity/project`: final metrics from the summaries of finished runs,
    everything else listed as incomplete (per-t curves and images stay in the run directories)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs, incomplete = [], []
    for remote in api.runs(path):
        config = dict(remote.config)
        where = f"wandb:{path}/{remote.id}"
        arm, seed, group = config.get("arm", arm_of(config, "?")), config.get("seed"), config_group(config)
        summary = {
            k.removeprefix("final/"): v for k, v in dict(remote.summary).items() if k.startswith("final/")
        }
        metrics, dropped = finite_metrics(summary)
        if remote.state != "finished" or not metrics or seed is None or group is None:
            reason = (
                f"W&B state {remote.state}" if remote.state != "finished" else "no final metrics or config"
            )
            incomplete.append(Incomplete(where, reason, arm, "?" if seed is None else seed, group))
            continue
        runs.append(
            Run(
                arm=arm,
                seed=int(seed),
                group=group,
                metrics=metrics,
                head=config.get("objective", {}).get("head", "?"),
                weighting=config.get("objective", {}).get("weighting", "?"),
                data=config["data"]["name"],
                profile=config["profile"],
                steps=int(config["trainer"]["max_steps"]),
                config=config,
                dropped=dropped,
                created=datetime.fromisoformat(remote.created_at.replace("Z", "+00:00")).timestamp(),
            )
        )
    return newest(runs), incomplete


def by_group(runs: list[Run], incomplete: list[Incomplete]) -> dict[str, tuple[list[Run], list[Incomplete]]]:
    """{group: (runs, incomplete runs)}; an incomplete run whose config is unreadable is listed
    in every group, since it could belong to any."""
    groups: dict[str, tuple[list[Run], list[Incomplete]]] = defaultdict(lambda: ([], []))
    for run in runs:
        groups[run.group][0].append(run)
    for item in incomplete:
        if item.group is not None:
            groups[item.group][1].append(item)
    for item in incomplete:
        if item.group is None:
            for group in list(groups) or ["unknown"]:
                groups[group][1].append(item)
    return dict(groups)


def seed_values(runs: list[Run]) -> dict[str, dict[str, dict[int, float]]]:
    """{arm: {metric: {seed: value}}}: the shape every statistic is computed from."""
    values: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        for metric, value in run.metrics.items():
            values[run.arm][metric][run.seed] = value
    return {arm: dict(metrics) for arm, metrics in values.items()}


def budget_values(runs: list[Run]) -> dict[int, dict[str, dict[str, dict[int, float]]]]:
    """{step: {arm: {metric: {seed: value}}}} from the runs' per-budget tables (finite values)."""
    table: dict[int, dict[str, dict[str, dict[int, float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict))
    )
    for run in runs:
        for row in run.budgets:
            kept, _ = finite_metrics({k: v for k, v in row.items() if k not in ("step", "wall_time_s")})
            for metric, value in kept.items():
                table[int(row["step"])][run.arm][metric][run.seed] = value
    return {step: {arm: dict(m) for arm, m in arms.items()} for step, arms in sorted(table.items())}


def seed_curves(runs: list[Run], curve: Curve) -> dict[str, dict[int, tuple[list[float], list[float]]]]:
    """{arm: {seed: (t, value)}} for one per-t curve present in the run directories."""
    curves: dict[str, dict[int, tuple[list[float], list[float]]]] = defaultdict(dict)
    for run in runs:
        if run.directory is not None and (values := RunDir(run.directory).read_curve(curve)):
            curves[run.arm][run.seed] = values
    return dict(curves)
