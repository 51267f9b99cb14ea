"""Finished and unfinished runs found on disk (or in W&B), grouped into comparable sets."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from dataclasses import dataclass, field
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
    data: str
    profile: str
    steps: int
    metrics: dict[str, float]
    evaluation: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    directory: Path | None = None

    @property
    def group(self) -> str:
        return group_name(self.profile, self.data, self.steps)


@dataclass
class Incomplete:
    """A run directory without a usable results.json, and why."""

    directory: Path
    reason: str
    experiment: str = "?"
    seed: int | str = "?"
    group: str | None = None


def group_name(profile: str, data: str, steps: int) -> str:
    """Runs are compared only with runs of the same data, profile and training budget."""
    return f"{profile}-{data}-{steps}steps"


def read_config(directory: Path) -> dict | None:
    try:
        config = yaml.safe_load((directory / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def load_run(directory: Path) -> Run | Incomplete:
    """A run directory as a Run, or as an Incomplete that says what is missing."""
    config = read_config(directory) or {}
    experiment = config.get("experiment", directory.parent.name)
    seed = config.get("seed", "?")
    group = None
    if {"profile", "data", "trainer"} <= config.keys():
        group = group_name(config["profile"], config["data"]["name"], config["trainer"]["max_steps"])
    path = directory / "results.json"
    if not path.is_file():
        reason = "no results.json (unfinished, interrupted or failed)"
        return Incomplete(directory, reason, experiment, seed, group)
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return Incomplete(directory, f"results.json unreadable ({error})", experiment, seed, group)
    if not isinstance(results, dict) or results.get("status") != "complete" or "metrics" not in results:
        return Incomplete(directory, "results.json not marked complete", experiment, seed, group)
    return Run(
        experiment=results.get("experiment", experiment),
        seed=int(results.get("seed", seed)),
        data=results.get("data", "?"),
        profile=results.get("profile", "?"),
        steps=int(results.get("steps", 0)),
        metrics={k: float(v) for k, v in results["metrics"].items()},
        evaluation=results.get("evaluation", {}),
        config=config,
        directory=directory,
    )


def scan(root: Path) -> tuple[list[Run], list[Incomplete]]:
    """Every run directory under `root` (a folder holding config.yaml, W&B's own copies aside).
    Of several finished runs of one arm, seed and group the newest wins."""
    runs: dict[tuple[str, str, int], tuple[float, Run]] = {}
    incomplete = []
    for config in sorted(root.rglob("config.yaml")):
        directory = config.parent
        if "wandb" in directory.parts or "checkpoints" in directory.parts:
            continue
        loaded = load_run(directory)
        if isinstance(loaded, Incomplete):
            incomplete.append(loaded)
            continue
        key = (loaded.group, loaded.experiment, loaded.seed)
        mtime = (directory / "results.json").stat().st_mtime
        if key not in runs or runs[key][0] < mtime:
            runs[key] = (mtime, loaded)
    return [run for _, run in runs.values()], incomplete


def from_wandb(path: str) -> list[Run]:
    """Finished runs of a W&B project `entity/project`: final metrics from their summaries
    (per-t curves and images stay with the local run directories)."""
    import wandb

    found = []
    for remote in wandb.Api().runs(path, filters={"state": "finished"}):
        config = dict(remote.config)
        metrics = {
            key.removeprefix("final/"): float(value)
            for key, value in remote.summary.items()
            if key.startswith("final/") and isinstance(value, (int, float))
        }
        if not metrics or "experiment" not in config:
            continue
        found.append(
            Run(
                experiment=config["experiment"],
                seed=int(config.get("seed", 0)),
                data=config.get("data", {}).get("name", "?"),
                profile=config.get("profile", "?"),
                steps=int(config.get("trainer", {}).get("max_steps", 0)),
                metrics=metrics,
                config=config,
            )
        )
    return found


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
