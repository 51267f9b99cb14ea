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
from diffbench.core.diffusion import NoiseSchedule
from diffbench.rundir import (
    CHECKPOINTS,
    COMPLETE,
    CONFIG,
    DIVERGED,
    RESULTS,
    Curve,
    RunDir,
)
from diffbench.schema import is_int
from diffbench.tracking import plain, summary_results

REFERENCE = Arm("eps", "own")
"""DDPM's L_simple: the arm every other is compared with in the report's table."""


@dataclass
class Run:
    """One finished trial: its arm, headline metrics and where its curves and images are."""

    arm: Arm
    seed: int
    group: str
    metrics: dict[str, float]
    data: str = "?"
    profile: str = "?"
    steps: int = 0
    evaluation: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    directory: Path | None = None
    remote: str | None = None
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
    arm: Arm | None = None
    seed: int | str = "?"
    group: str | None = None
    diverged: bool = False
    diverged_at: int | None = None

    @property
    def label(self) -> str:
        """The arm's name, or `?` where the run's config does not say."""
        return self.arm.label if self.arm else "?"


ARM_KEYS = ("seed", "experiment", "arm", "run", "wandb", "report", "speed")
"""Config keys that may differ between runs of one group: the arm, the seed, where a run is
written or logged, the report's margins (checked for agreement separately) and the speed settings
(threads, kernels: how fast, never what is computed). Everything else (learning rate, clipping,
EMA, batch, model, budget, diffusion, evaluation) splits groups."""


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


def arm_of(config: dict) -> Arm | None:
    """The arm a config trained, from its head and weighting (never parsed from a folder name)."""
    objective = config.get("objective") or {}
    try:
        return Arm(objective["head"], objective["weighting"])
    except (KeyError, TypeError, ValueError):
        return None


def load_run(directory: Path) -> Run | Incomplete:
    """A run directory as a Run, or as an Incomplete that says what is missing or inconsistent.
    Where results.json lacks a field (a run evaluated again by `diffbench.evaluate`), config.yaml says."""
    run_dir = RunDir(directory)
    config, unreadable = run_dir.read_config_or_reason()
    config = config or {}
    arm = arm_of(config)
    label = arm.label if arm else directory.parent.name
    seed = config.get("seed", "?")
    group = config_group(config)

    def incomplete(reason: str, diverged: bool = False, step: int | None = None) -> Incomplete:
        return Incomplete(directory, reason, arm, seed, group, diverged, step)

    if unreadable:
        return incomplete(unreadable)
    if not (run_dir / RESULTS).is_file():
        return incomplete(f"no {RESULTS} (unfinished, interrupted or failed)")
    results, problem = run_dir.read_results_or_reason()
    if results is None:
        return incomplete(problem or f"{RESULTS} unreadable")
    if results.get("status") == DIVERGED:
        reason, step = divergence(results)
        return incomplete(reason, True, step)
    if results.get("status") != COMPLETE:
        return incomplete(f"{RESULTS} not marked complete")
    metrics, dropped = finite_metrics(results.get("metrics"))
    try:
        seed = int(results.get("seed", seed))
    except (TypeError, ValueError):
        return incomplete(f"{RESULTS} has no usable seed")
    if config.get("seed") not in (None, seed):
        return incomplete(
            f"{RESULTS} says seed {seed} but {CONFIG} says seed {config['seed']}: a copied or edited "
            "file; left out rather than counted as either seed"
        )
    if results.get("arm") not in (None, label):
        return incomplete(f"{RESULTS} says arm {results['arm']} but {CONFIG} trained {label}")
    if not metrics or group is None or arm is None:
        reason = f"{RESULTS} has no metrics" if not metrics else f"{CONFIG} missing or incomplete"
        return incomplete(reason)
    return Run(
        arm=arm,
        seed=seed,
        group=group,
        metrics=metrics,
        data=config["data"]["name"],
        profile=config["profile"],
        steps=int(results.get("steps", config["trainer"]["max_steps"])),
        config=config,
        directory=directory,
        dropped=dropped,
        created=(directory / RESULTS).stat().st_mtime,
        **recorded(results),
    )


def divergence(results: dict) -> tuple[str, int | None]:
    """Why a diverged run has no metrics, and the step it diverged at (None where unrecorded)."""
    step = results.get("diverged_at_step")
    reason = f"diverged at step {step if step is not None else '?'} (non-finite training loss): no metrics"
    return reason, step if is_int(step) else None


def recorded(results: dict) -> dict:
    """What a Run takes from a results.json record besides its metrics, read alike from a run
    directory and from a W&B summary: the evaluation settings, the optimisation record and the
    per-budget rows (a row without a positive integer step is passed over)."""
    evaluation, optimisation = results.get("evaluation"), results.get("optimisation")
    rows = results.get("budgets")
    return {
        "evaluation": evaluation if isinstance(evaluation, dict) else {},
        "optimisation": optimisation if isinstance(optimisation, dict) else {},
        "budgets": [row for row in rows if isinstance(row, dict) and is_step(row.get("step"))]
        if isinstance(rows, list)
        else [],
    }


def is_step(value: object) -> bool:
    return is_int(value) and value > 0


def where(run: Run) -> str:
    """Where a run's numbers came from: its directory, or its W&B run."""
    return str(run.directory) if run.directory is not None else run.remote or "W&B"


def deduplicate(runs: list[Run]) -> tuple[list[Run], list[Incomplete]]:
    """One run per (group, arm, seed). Copies with identical metrics are one measurement (a trial
    found by two sweeps, a W&B rerun): counted once, the others listed. Copies that disagree are
    all left out and listed: the report cannot know which one the reader meant to count."""
    by_key: dict[tuple[str, Arm, int], list[Run]] = defaultdict(list)
    for run in runs:
        by_key[(run.group, run.arm, run.seed)].append(run)
    kept, listed = [], []
    for (group, arm, seed), copies in by_key.items():
        copies.sort(key=lambda r: r.created)
        if len(copies) == 1 or all(c.metrics == copies[0].metrics for c in copies):
            kept.append(copies[0])
            reason = f"a copy of {where(copies[0])} (identical metrics): counted once"
            listed += [Incomplete(where(c), reason, arm, seed, group) for c in copies[1:]]
            continue
        reason = (
            f"{len(copies)} runs of {arm.label} seed {seed} in this group disagree: all left out of the "
            "intervals; move away the ones that should not count"
        )
        listed += [Incomplete(where(c), reason, arm, seed, group) for c in copies]
    return kept, listed


def scan(root: Path) -> tuple[list[Run], list[Incomplete]]:
    """Every run directory under `root` (a folder holding config.yaml), passing over W&B's copies
    and checkpoint folders inside runs; only the path below `root` is looked at, so runs kept
    under a folder that happens to be called `checkpoints` are still found."""
    runs, incomplete = [], []
    for config in sorted(root.rglob(CONFIG)):
        directory = config.parent
        inside = directory.relative_to(root).parts
        if "wandb" in inside or CHECKPOINTS in inside:
            continue
        loaded = load_run(directory)
        (incomplete if isinstance(loaded, Incomplete) else runs).append(loaded)
    kept, duplicates = deduplicate(runs)
    return kept, incomplete + duplicates


def from_wandb(path: str, api: object | None = None) -> tuple[list[Run], list[Incomplete]]:
    """Runs of a W&B project `entity/project`: from the summaries of finished runs, what results.json
    holds (final metrics, evaluation settings, optimisation record, per-budget rows; see
    `tracking.wandb_summary`), everything else listed as incomplete (per-t curves and images stay
    in the run directories)."""
    if api is None:
        import wandb

        api = wandb.Api()
    runs, incomplete = [], []
    for remote in api.runs(path):
        config = plain(remote.config)
        config = config if isinstance(config, dict) else {}
        location = f"wandb:{path}/{remote.id}"
        arm, seed, group = arm_of(config), config.get("seed"), config_group(config)
        results = summary_results(remote.summary)
        metrics, dropped = finite_metrics(results["metrics"])
        if results.get("status") == DIVERGED:
            reason, step = divergence(results)
            incomplete.append(
                Incomplete(location, reason, arm, "?" if seed is None else seed, group, True, step)
            )
            continue
        if remote.state != "finished" or not metrics or seed is None or group is None or arm is None:
            reason = (
                f"W&B state {remote.state}" if remote.state != "finished" else "no final metrics or config"
            )
            incomplete.append(Incomplete(location, reason, arm, "?" if seed is None else seed, group))
            continue
        steps = results.get("steps")
        runs.append(
            Run(
                arm=arm,
                seed=int(seed),
                group=group,
                metrics=metrics,
                data=config["data"]["name"],
                profile=config["profile"],
                steps=steps if is_int(steps) else int(config["trainer"]["max_steps"]),
                config=config,
                dropped=dropped,
                remote=location,
                created=datetime.fromisoformat(remote.created_at.replace("Z", "+00:00")).timestamp(),
                **recorded(results),
            )
        )
    kept, duplicates = deduplicate(runs)
    return kept, incomplete + duplicates


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


Values = dict[Arm, dict[str, dict[int, float]]]
"""{arm: {metric: {seed: value}}}: the shape every statistic is computed from."""


def group_margins(runs: list[Run]) -> tuple[dict[str, float], list[str]]:
    """The equivalence margins the runs declared before they ran (`report.margins`), and, when the
    runs of one group declare different ones, a line per disagreeing run (then no margin holds)."""
    declared: dict[str, list[tuple[float, Run]]] = defaultdict(list)
    for run in runs:
        for key, value in ((run.config.get("report") or {}).get("margins") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                declared[key].append((float(value), run))
    margins, conflicts = {}, []
    for key, entries in sorted(declared.items()):
        values = sorted({value for value, _ in entries})
        if len(values) == 1 and len(entries) == len(runs):
            margins[key] = values[0]
            continue
        common = max(values, key=lambda v: sum(value == v for value, _ in entries))
        odd = [
            f"{where(run)} ({run.arm.label} s{run.seed}: {value:g})"
            for value, run in entries
            if value != common
        ]
        missing = len(runs) - len(entries)
        conflicts.append(
            f"report.margins.{key}: {common:g} in most runs, but "
            + ", ".join(odd + ([f"{missing} run(s) declare none"] if missing else []))
        )
    return margins, conflicts


def seed_values(runs: list[Run]) -> Values:
    """{arm: {metric: {seed: value}}} over the finished runs."""
    values: Values = defaultdict(lambda: defaultdict(dict))
    for run in runs:
        for metric, value in run.metrics.items():
            values[run.arm][metric][run.seed] = value
    return {arm: dict(metrics) for arm, metrics in values.items()}


def budget_values(runs: list[Run]) -> dict[int, Values]:
    """{step: {arm: {metric: {seed: value}}}} from the runs' per-budget tables (finite values)."""
    table: dict[int, Values] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for run in runs:
        for row in run.budgets:
            kept, _ = finite_metrics({k: v for k, v in row.items() if k not in ("step", "wall_time_s")})
            for metric, value in kept.items():
                table[int(row["step"])][run.arm][metric][run.seed] = value
    return {step: {arm: dict(m) for arm, m in arms.items()} for step, arms in sorted(table.items())}


Curves = dict[Arm, dict[int, tuple[list[float], list[float]]]]


def seed_curves(runs: list[Run], curve: Curve) -> Curves:
    """{arm: {seed: (t, value)}} for one per-t curve present in the run directories."""
    curves: Curves = defaultdict(dict)
    for run in runs:
        if run.directory is not None and (values := RunDir(run.directory).read_curve(curve)):
            curves[run.arm][run.seed] = values
    return dict(curves)


def schedule_of(runs: list[Run]) -> tuple[NoiseSchedule, str]:
    """The diffusion schedule these runs were trained with (the package defaults if unrecorded)."""
    diffusion = next((r.config.get("diffusion") for r in runs if r.config.get("diffusion")), {})
    schedule = NoiseSchedule(diffusion.get("schedule", "linear"), int(diffusion.get("num_timesteps", 1000)))
    return schedule, diffusion.get("variance", "small")
