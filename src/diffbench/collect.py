"""Finished and unfinished runs found on disk (or in W&B), grouped into comparable sets."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

ARMS = ("eps_simple", "eps_elbo", "x0_simple", "x0_elbo", "score_simple", "score_elbo")
HEADS = ("eps", "x0", "score")
REFERENCE = "eps_simple"


@dataclass
class Run:
    """One finished trial: its headline metrics and where its curves and images are."""

    experiment: str
    seed: int
    group: str
    metrics: dict[str, float]
    data: str = "?"
    profile: str = "?"
    steps: int = 0
    evaluation: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    directory: Path | None = None
    dropped: list[str] = field(default_factory=list)
    created: float = 0.0


@dataclass
class Incomplete:
    """A run (directory or W&B run) without usable results, and why."""

    directory: Path | str
    reason: str
    experiment: str = "?"
    seed: int | str = "?"
    group: str | None = None


DEFAULT_DIFFUSION = {"schedule": "linear", "num_timesteps": 1000, "variance": "small"}


def group_name(profile: str, data: str, steps: int, diffusion: dict | None = None) -> str:
    """Runs are compared only with runs of the same data, profile, training budget and diffusion
    process; the process is named only when it is not DDPM's linear T = 1000 with σ² = β̃."""
    name = f"{profile}-{data}-{steps}steps"
    process = {**DEFAULT_DIFFUSION, **(diffusion or {})}
    if process != DEFAULT_DIFFUSION:
        name += f"-{process['schedule']}-T{process['num_timesteps']}-{process['variance']}"
    return name


def config_group(config: dict) -> str | None:
    """The group a run belongs to according to its resolved config (None if it cannot say)."""
    try:
        return group_name(
            config["profile"],
            config["data"]["name"],
            int(config["trainer"]["max_steps"]),
            {k: v for k, v in (config.get("diffusion") or {}).items() if k in DEFAULT_DIFFUSION},
        )
    except (KeyError, TypeError, ValueError):
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


def read_config(directory: Path) -> dict | None:
    try:
        config = yaml.safe_load((directory / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def load_run(directory: Path) -> Run | Incomplete:
    """A run directory as a Run, or as an Incomplete that says what is missing. Where
    results.json lacks a field (a run evaluated again by `diffbench.evaluate`), config.yaml says."""
    config = read_config(directory) or {}
    experiment = config.get("experiment", directory.parent.name)
    seed = config.get("seed", "?")
    group = config_group(config)
    path = directory / "results.json"
    if not path.is_file():
        reason = "no results.json (unfinished, interrupted or failed)"
        return Incomplete(directory, reason, experiment, seed, group)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return Incomplete(directory, f"results.json unreadable ({error})", experiment, seed, group)
    if not isinstance(results, dict) or results.get("status") != "complete":
        return Incomplete(directory, "results.json not marked complete", experiment, seed, group)
    metrics, dropped = finite_metrics(results.get("metrics"))
    try:
        seed = int(results.get("seed", seed))
    except (TypeError, ValueError):
        return Incomplete(directory, "results.json has no usable seed", experiment, seed, group)
    if not metrics or group is None:
        reason = "results.json has no metrics" if not metrics else "config.yaml missing or incomplete"
        return Incomplete(directory, reason, experiment, seed, group)
    return Run(
        experiment=results.get("experiment", experiment),
        seed=seed,
        group=group,
        metrics=metrics,
        data=config["data"]["name"],
        profile=config["profile"],
        steps=int(results.get("steps", config["trainer"]["max_steps"])),
        evaluation=results.get("evaluation", {}) if isinstance(results.get("evaluation"), dict) else {},
        config=config,
        directory=directory,
        dropped=dropped,
        created=path.stat().st_mtime,
    )


def newest(runs: list[Run]) -> list[Run]:
    """Of several finished runs of one arm and seed in a group, the newest wins."""
    chosen: dict[tuple[str, str, int], Run] = {}
    for run in runs:
        key = (run.group, run.experiment, run.seed)
        if key not in chosen or chosen[key].created < run.created:
            chosen[key] = run
    return list(chosen.values())


def scan(root: Path) -> tuple[list[Run], list[Incomplete]]:
    """Every run directory under `root` (a folder holding config.yaml, W&B's own copies aside)."""
    runs, incomplete = [], []
    for config in sorted(root.rglob("config.yaml")):
        directory = config.parent
        if "wandb" in directory.parts or "checkpoints" in directory.parts:
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
        experiment, seed, group = config.get("experiment", "?"), config.get("seed"), config_group(config)
        summary = {
            k.removeprefix("final/"): v for k, v in dict(remote.summary).items() if k.startswith("final/")
        }
        metrics, dropped = finite_metrics(summary)
        if remote.state != "finished" or not metrics or seed is None or group is None:
            reason = (
                f"W&B state {remote.state}" if remote.state != "finished" else "no final metrics or config"
            )
            incomplete.append(Incomplete(where, reason, experiment, "?" if seed is None else seed, group))
            continue
        runs.append(
            Run(
                experiment=experiment,
                seed=int(seed),
                group=group,
                metrics=metrics,
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
    """{experiment: {metric: {seed: value}}}: the shape every statistic is computed from."""
    values: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        for metric, value in run.metrics.items():
            values[run.experiment][metric][run.seed] = value
    return {arm: dict(metrics) for arm, metrics in values.items()}


def read_curve(path: Path) -> tuple[list[float], list[float]] | None:
    """A two-column CSV written by the evaluation (e.g. t, eps_mse), or None if absent or broken."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))[1:]
        return [float(r[0]) for r in rows], [float(r[1]) for r in rows]
    except (OSError, ValueError, IndexError):
        return None


def seed_curves(runs: list[Run], filename: str) -> dict[str, dict[int, tuple[list[float], list[float]]]]:
    """{experiment: {seed: (t, value)}} for one per-t CSV present in the run directories."""
    curves: dict[str, dict[int, tuple[list[float], list[float]]]] = defaultdict(dict)
    for run in runs:
        if run.directory is not None and (curve := read_curve(run.directory / filename)):
            curves[run.experiment][run.seed] = curve
    return dict(curves)
