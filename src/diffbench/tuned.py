"""`OBJ=tuned` as library code: stage 1 trains every arm at each rate, with gradient clipping off
and on, on the tuning seed without the final evaluation; each arm's (rate, clip) per claim family
is chosen from its validation metrics (`analysis.tuning`), and an arm whose choice sits at an end
of the rate grid trains one rate further on that side (at most MAX_WIDENINGS times). Stage 2
trains every arm on the evaluation seeds at the shared default, at DDPM's own setting and at its
chosen settings. A rerun skips what is done; the report compares the claims across these
optimiser settings (`analysis.optimiser`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from diffbench import atomic, launch
from diffbench.analysis.collect import load_run, scan
from diffbench.analysis.optimiser import default_clip, default_rate, find_tuned
from diffbench.analysis.settled import Agreement
from diffbench.analysis.tuning import (
    CLIP_KEY,
    DDPM,
    FAMILIES,
    MAX_WIDENINGS,
    TUNING_CLIPS,
    Choice,
    OptimSetting,
    TuningRecord,
    TuningTrial,
    choose,
    clip_text,
    trial_of,
    tuning_record,
    widening,
)
from diffbench.config import ConfigError
from diffbench.core.arms import Arm
from diffbench.launch import LaunchOptions, Outcome
from diffbench.plan import (
    CLIP_OFF,
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
    trials the plain sweep runs) and stage 1, every arm at each rate and clipping on the tuning
    seed (before any widening)."""

    sweep: Sweep
    evaluation: list[Trial]
    stage1: Sweep
    tuning: list[Trial]


@dataclass(frozen=True)
class Tuning:
    """What stage 1 chose: its trials, each arm's (rate, clip) per family, the record of the
    choice, the default clipping and each arm's widenings (the rates each round added)."""

    trials: list[TuningTrial]
    choices: dict[str, dict[Arm, Choice]]
    default: float
    record: TuningRecord
    default_clip: float | None = None
    widened: dict[Arm, list[list[float]]] = field(default_factory=dict)

    @property
    def default_setting(self) -> OptimSetting:
        return OptimSetting(self.default, self.default_clip)


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


def choose_rates(tuning: list[Trial], widened: dict[Arm, list[list[float]]] | None = None) -> Tuning | None:
    """Each arm's (rate, clip) per family from the finished stage 1, or None while a trial is
    missing (stage 2 needs every setting of every arm)."""
    found = [trial_of(load_run(t.directory)) for t in tuning]
    trials = [t for t in found if t is not None]
    if len(trials) < len(found):
        return None
    default, clip = default_rate(), default_clip()
    choices = {family: choose(trials, family, default, clip) for family in FAMILIES}
    record = tuning_record(trials, choices, TUNING_SEED, default, clip, widened)
    return Tuning(trials, choices, default, record, clip, dict(widened or {}))


def widen(tuned: TunedPlan, tuning: Tuning, check: Check, here: bool = True) -> dict[Arm, list[Trial]]:
    """Per arm whose choice sits at an end of its rate grid (and that has widened fewer than
    MAX_WIDENINGS times): its stage-1 trials at one rate past each such end, at every clipping."""
    added: dict[Arm, list[Trial]] = {}
    for arm in dict.fromkeys(t.spec.arm for t in tuned.tuning):
        rates = widening(tuning.choices, arm) if len(tuning.widened.get(arm, [])) < MAX_WIDENINGS else []
        base = [t.point for t in tuned.tuning if t.spec.arm == arm]
        points = dict.fromkeys(tuple({**p, "optim.lr": rate}.items()) for rate in rates for p in base)
        if points:
            added[arm] = trials_at(tuned.stage1, [dict(p) for p in points], check, here)
    return added


def at_setting(point: dict, setting: OptimSetting, default: OptimSetting) -> dict:
    """A trial's point at an optimiser setting: its rate, and its clipping where that differs
    from the default (so the default-setting point is the plain sweep's, rate aside)."""
    clip = (
        {} if setting.clip == default.clip else {CLIP_KEY: CLIP_OFF if setting.clip is None else setting.clip}
    )
    return {**point, "optim.lr": setting.lr, **clip}


def stage_two(tuned: TunedPlan, tuning: Tuning, check: Check, here: bool = True) -> list[Trial]:
    """Every evaluation trial at the shared default, at DDPM's own setting and at each setting
    chosen for its arm."""
    default = tuning.default_setting
    points = []
    for trial in tuned.evaluation:
        chosen = {
            c.setting
            for family in tuning.choices.values()
            if (c := family.get(trial.spec.arm)) and c.setting is not None
        }
        settings = sorted({default, DDPM, *chosen}, key=lambda s: s.order)
        points += [at_setting(trial.point, setting, default) for setting in settings]
    return trials_at(tuned.sweep, points, check, here)


def record_stem(tuned: TunedPlan) -> Path:
    """`<trials root>/tuning-<sweep>`: where the choice is written, as .md and .json."""
    return trials_root(tuned.tuning[0].directory) / f"tuning-{tuned.sweep.name}"


def run(tuned: TunedPlan, options: LaunchOptions, check: Check) -> TunedResult:
    """Stage 1 (the trials still to run), widened for each arm whose choice sits at an end of the
    rate grid (bounded), the choice written beside the trials, then stage 2."""
    rates = tuned.stage1.parameters["optim.lr"]["values"]
    clips = " and ".join("off" if c is None else f"at {clip_text(c)}" for c in TUNING_CLIPS)
    trials, todo = list(tuned.tuning), pending(tuned.tuning)
    widened: dict[Arm, list[list[float]]] = {}
    heading = (
        f"[sweep] stage 1: {len(trials)} trials ({len(todo)} to run), every arm at optim.lr "
        f"{', '.join(map(str, rates))} with gradient clipping {clips} on tuning seed {TUNING_SEED} (no "
        "final evaluation; budget metrics against validation images)"
    )
    while True:
        print(heading)
        if todo:
            outcome = launch.run(todo, options, tuned.stage1.name)
            if outcome.code is not None:
                return TunedResult(1, outcome)
        tuning = choose_rates(trials, widened)
        if tuning is None:
            return TunedResult(1, Outcome(), missing=len(pending(trials)))
        added = widen(tuned, tuning, check, options.here)
        if not added:
            break
        more = [t for arm_trials in added.values() for t in arm_trials]
        todo = pending(more)
        for arm, arm_trials in added.items():
            new = sorted({t.spec.optim.lr for t in arm_trials})
            widened[arm] = [*widened.get(arm, []), new]
        heading = (
            "[sweep] stage 1 widened (a choice sat at an end of the rate grid): "
            + "; ".join(
                f"{arm.label} at optim.lr {', '.join(f'{r:g}' for r in widened[arm][-1])} "
                f"({len(widened[arm])} of {MAX_WIDENINGS})"
                for arm in added
            )
            + f", clipping {clips}: {len(more)} trials ({len(todo)} to run)"
        )
        trials += more
    stem = record_stem(tuned)
    atomic.write_text(stem.with_suffix(".json"), json.dumps(tuning.record.payload, indent=2) + "\n")
    atomic.write_text(stem.with_suffix(".md"), tuning.record.markdown)
    print(tuning.record.markdown)
    print(f"[sweep] rate choice written to {stem}.md and .json")
    stage2 = stage_two(tuned, tuning, check, options.here)
    print(
        f"[sweep] stage 2: {len(stage2)} trials, every arm on seeds "
        f"{', '.join(sorted({str(t.point['seed']) for t in stage2}))} at the default "
        f"({tuning.default_setting.name}), DDPM's ({DDPM.name}) and its chosen settings"
    )
    return TunedResult(2, launch.run(stage2, options, tuned.sweep.name), 0, tuning, stage2)


def agreements(stage2: list[Trial]) -> dict[int, Agreement]:
    """Whether each claim's verdict is the same at every optimiser setting, read back from the
    trials' directories as the report reads them (empty until stage 2 has finished)."""
    runs, incomplete = scan(trials_root(stage2[0].directory))
    ours = {t.directory for t in stage2}
    found = find_tuned(runs, incomplete)[0]
    return next((t.agreements for t in found if any(r.directory in ours for r in t.runs)), {})
