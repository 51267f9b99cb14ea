"""`OBJ=tuned` as library code: stage 1 trains every arm at each rate on the tuning seed without
the final evaluation, each arm's rate per claim family is chosen from its validation metrics
(`analysis.tuning`), and stage 2 trains every arm on the evaluation seeds at the shared default
rate and at its chosen rates. A rerun skips what is done; the report compares the claims across
these optimiser settings (`analysis.optimiser`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from diffbench import atomic, launch
from diffbench.analysis.collect import load_run, scan
from diffbench.analysis.optimiser import default_rate, find_tuned
from diffbench.analysis.settled import Agreement
from diffbench.analysis.tuning import (
    FAMILIES,
    Choice,
    TuningRecord,
    TuningTrial,
    choose,
    trial_of,
    tuning_record,
)
from diffbench.config import ConfigError
from diffbench.launch import LaunchOptions, Outcome
from diffbench.plan import (
    TUNED_OBJ,
    TUNING_SEED,
    Check,
    Sweep,
    SweepOptions,
    Trial,
    parse_rates,
    plan,
    trials_at,
    tuning_sweep,
)
from diffbench.rundir import trials_root


@dataclass(frozen=True)
class TunedPlan:
    """The tuned sweep before anything runs: its evaluation trials at the default rate (the very
    trials the plain sweep runs) and stage 1, every arm at each rate on the tuning seed."""

    sweep: Sweep
    evaluation: list[Trial]
    stage1: Sweep
    tuning: list[Trial]


@dataclass(frozen=True)
class Tuning:
    """What stage 1 chose: its trials, each arm's rate per family, and the record of the choice."""

    trials: list[TuningTrial]
    choices: dict[str, dict[str, Choice]]
    default: float
    record: TuningRecord


@dataclass(frozen=True)
class TunedResult:
    """Where the tuned flow ended: the stage (1 or 2) and that stage's launch outcome; `missing`
    stage-1 trials that neither finished nor diverged (stage 2 then waits); the choice and stage
    2's trials once made."""

    stage: int
    outcome: Outcome
    missing: int = 0
    tuning: Tuning | None = None
    stage2: list[Trial] = field(default_factory=list)


def prepare(sweep: Sweep, evaluation: list[Trial], options: SweepOptions, check: Check) -> TunedPlan:
    """Stage 1 of the sweep, checked like every trial; evaluation seeds that hold the tuning seed
    are refused, since a test on the seed that chose the rate is biased in its favour."""
    if any(trial.point.get("seed") == TUNING_SEED for trial in evaluation):
        raise ConfigError(
            f"SEEDS includes {TUNING_SEED}, the seed OBJ={TUNED_OBJ} chooses the learning rates on: "
            "a test on the seed that chose the rate is biased in its favour. Pick evaluation seeds "
            f"without {TUNING_SEED}; nothing was started."
        )
    stage1 = tuning_sweep(sweep, parse_rates(options.rates), TUNING_SEED)
    return TunedPlan(sweep, evaluation, stage1, plan(stage1, options, check))


def pending(tuning: list[Trial]) -> list[Trial]:
    """Stage-1 trials that neither finished nor diverged yet."""
    return [t for t in tuning if trial_of(load_run(t.directory)) is None]


def choose_rates(tuning: list[Trial]) -> Tuning | None:
    """Each arm's rate per family from the finished stage 1, or None while a trial is missing
    (stage 2 needs every rate of every arm)."""
    found = [trial_of(load_run(t.directory)) for t in tuning]
    trials = [t for t in found if t is not None]
    if len(trials) < len(found):
        return None
    default = default_rate()
    choices = {family: choose(trials, family, default) for family in FAMILIES}
    return Tuning(trials, choices, default, tuning_record(trials, choices, TUNING_SEED, default))


def stage_two(tuned: TunedPlan, tuning: Tuning, check: Check, here: bool = True) -> list[Trial]:
    """Every evaluation trial at the shared default rate and at each rate chosen for its arm."""
    points = []
    for trial in tuned.evaluation:
        chosen = {
            c.rate for family in tuning.choices.values() if (c := family.get(trial.spec.arm)) and c.rate
        }
        points += [{**trial.point, "optim.lr": rate} for rate in sorted({tuning.default, *chosen})]
    return trials_at(tuned.sweep, points, check, here)


def record_stem(tuned: TunedPlan) -> Path:
    """`<trials root>/tuning-<sweep>`: where the choice is written, as .md and .json."""
    return trials_root(tuned.tuning[0].directory) / f"tuning-{tuned.sweep.name}"


def run(tuned: TunedPlan, options: LaunchOptions, check: Check) -> TunedResult:
    """Stage 1 (the trials still to run), the choice written beside the trials, then stage 2."""
    todo = pending(tuned.tuning)
    rates = tuned.stage1.parameters["optim.lr"]["values"]
    print(
        f"[sweep] stage 1: {len(tuned.tuning)} trials ({len(todo)} to run), every arm at optim.lr "
        f"{', '.join(map(str, rates))} on tuning seed {TUNING_SEED} (no final evaluation; budget metrics "
        "against validation images)"
    )
    if todo:
        outcome = launch.run(todo, options, tuned.stage1.name)
        if outcome.code is not None:
            return TunedResult(1, outcome)
    tuning = choose_rates(tuned.tuning)
    if tuning is None:
        return TunedResult(1, Outcome(), missing=len(pending(tuned.tuning)))
    stem = record_stem(tuned)
    atomic.write_text(stem.with_suffix(".json"), json.dumps(tuning.record.payload, indent=2) + "\n")
    atomic.write_text(stem.with_suffix(".md"), tuning.record.markdown)
    print(tuning.record.markdown)
    print(f"[sweep] rate choice written to {stem}.md and .json")
    stage2 = stage_two(tuned, tuning, check, options.here)
    print(
        f"[sweep] stage 2: {len(stage2)} trials, every arm on seeds "
        f"{', '.join(sorted({str(t.point['seed']) for t in stage2}))} at the default and its chosen rates"
    )
    return TunedResult(2, launch.run(stage2, options, tuned.sweep.name), 0, tuning, stage2)


def agreements(stage2: list[Trial]) -> dict[int, Agreement]:
    """Whether each claim's verdict is the same at every optimiser setting, read back from the
    trials' directories as the report reads them (empty until stage 2 has finished)."""
    runs, incomplete = scan(trials_root(stage2[0].directory))
    ours = {t.directory for t in stage2}
    found = find_tuned(runs, incomplete)[0]
    return next((t.agreements for t in found if any(r.directory in ours for r in t.runs)), {})
