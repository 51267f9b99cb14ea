"""A sweep as values: the `Sweep` a `sweeps/*.yaml` holds (read and checked once), and the
`Trial`s it plans — each grid point with its checked `RunSpec`, its command and its directory —
so every launcher runs, and the summary reads, the very same trials. `OBJ=lr` and the stages of
`OBJ=tuned` are functions from one sweep to another, never recognised by their names."""

from __future__ import annotations

import itertools
import math
import os
import shlex
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from diffbench.analysis.tuning import CLIP_KEY, TUNING_CLIPS, TUNING_ONLY
from diffbench.config import ConfigError, available, find_choice, is_name, yaml_problem
from diffbench.rundir import trial_dir
from diffbench.spec import RunSpec

SUMMARY_NAME = "summary"
LR_OBJ = "lr"
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
"""optim.lr of the learning-rate check: the default 1e-3 and a factor of about 3 either side."""
LR_SEED = 0
TUNED_OBJ = "tuned"
TUNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
"""Stage 1 of OBJ=tuned: four log-spaced rates, a factor of 3 to 10 around the default 1e-3."""
TUNING_SEED = 100
"""The seed the rates are chosen on: outside every evaluation seed, so selection cannot bias a test."""
STAGE1 = "-stage1"
CLIP_OFF = "null"
"""trainer.gradient_clip_val off, as a sweep point spells it (the run command reads `null` as None)."""
MAX_SEEDS = 1000
"""More seeds than any sweep here needs: a larger count is a typo (and would compose for hours)."""
MAX_TRIALS = 20_000
ARGS_MACRO = "${args_no_hyphens}"

Point = dict[str, object]
Check = Callable[[list[str], bool], RunSpec]
"""The run command's own check of a command line's overrides (`here`: on this machine's
hardware too), returning the spec the run would take or raising ConfigError."""


@dataclass(frozen=True)
class Sweep:
    """A sweep file as `wandb sweep` and the local runner both read it: its name, its parameters
    (each {value: …} or {values: […]}, in the file's order), its command, and what else W&B reads."""

    name: str
    parameters: dict[str, dict[str, Any]]
    command: tuple[str, ...]
    rest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, raw: dict[str, Any]) -> Sweep:
        rest = {k: v for k, v in raw.items() if k not in ("name", "parameters", "command")}
        return cls(raw["name"], dict(raw["parameters"]), tuple(raw["command"]), rest)

    def config(self) -> dict[str, Any]:
        """The sweep as W&B's sweep config (and the YAML) spells it."""
        return {**self.rest, "name": self.name, "parameters": self.parameters, "command": list(self.command)}

    def varied(self, name: str, parameters: dict[str, dict[str, Any]]) -> Sweep:
        return replace(self, name=name, parameters=parameters)

    def grid(self) -> list[Point]:
        """Every grid point as {parameter: value}, in the file's order; counted before it is built."""
        names = list(self.parameters)
        choices = [
            spec["values"] if "values" in spec else [spec["value"]] for spec in self.parameters.values()
        ]
        count = math.prod(len(c) for c in choices)
        if count > MAX_TRIALS:
            raise ConfigError(
                f"the sweep {self.name} has {count} trials, more than {MAX_TRIALS}; narrow its "
                "parameters (or SEEDS). Nothing was started."
            )
        return [dict(zip(names, combo)) for combo in itertools.product(*choices)]

    def command_of(self, point: Point) -> list[str]:
        """The sweep's command with W&B's macros filled in, as `wandb agent` would run it."""
        from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

        args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})
        filled = {"${interpreter}": [sys.executable], "${program}": [self.rest.get("program", "")]}
        filled.update({"${env}": [], ARGS_MACRO: args["args_no_hyphens"]})
        return [word for part in self.command for word in filled.get(part, [part])]


def point_label(point: Point) -> str:
    """How a trial is named in every message: its grid point as `key=value` words."""
    return " ".join(f"{k}={v}" for k, v in point.items())


@dataclass(frozen=True)
class Trial:
    """One run of a sweep: its grid point, the spec the run command checked it into, the command
    that runs it, its directory (`rundir.trial_dir`), and the other points naming the same run."""

    point: Point
    spec: RunSpec
    command: tuple[str, ...]
    directory: Path
    same: tuple[Point, ...] = ()

    @property
    def label(self) -> str:
        return point_label(self.point)


@dataclass(frozen=True)
class SweepOptions:
    """The make variables that shape a sweep's trials."""

    obj: str = "all"
    of: str = "all"
    profile: str | None = None
    data: str | None = None
    seeds: str | None = None
    args: str = ""
    gpus: int = 0
    rates: str | None = None
    here: bool = True
    """Whether the trials run on this machine (checked against its hardware too), not on a cluster."""


def sweeps_dir() -> Path:
    """`$DIFFBENCH_SWEEPS`, else `./sweeps` of the working directory, else this checkout's `sweeps/`."""
    env = os.environ.get("DIFFBENCH_SWEEPS")
    if env:
        return Path(env)
    local = Path.cwd() / "sweeps"
    return local if local.is_dir() else Path(__file__).resolve().parents[2] / "sweeps"


def valid_objs() -> list[str]:
    return sorted([*(p.stem for p in sweeps_dir().glob("*.yaml")), LR_OBJ, TUNED_OBJ]) + available(
        "experiment"
    )


def sweep_problem(sweep: object) -> str | None:
    """What keeps a loaded sweep file from being a grid this runner (and `wandb sweep`) can run."""
    if not isinstance(sweep, dict):
        return "it is not a mapping of sweep settings"
    missing = [key for key in ("name", "parameters", "command") if key not in sweep]
    if missing:
        return f"it has no {', '.join(missing)}"
    if not isinstance(sweep["command"], list) or ARGS_MACRO not in sweep["command"]:
        return "its command: is not a list holding ${args_no_hyphens}"
    parameters = sweep["parameters"]
    if not isinstance(parameters, dict) or not parameters:
        return "its parameters: is not a mapping of names to {value: …} or {values: […]}"
    for name, spec in parameters.items():
        values = spec.get("values") if isinstance(spec, dict) else None
        if not (isinstance(spec, dict) and ("value" in spec or (isinstance(values, list) and values))):
            return f"parameter {name!r} has neither value: nor a non-empty values: list"
    return None


def read_sweep(path: Path) -> Sweep:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{path} is not valid YAML ({yaml_problem(error)}); fix it, or pick another OBJ."
        ) from None
    problem = sweep_problem(raw)
    if problem:
        raise ConfigError(
            f"{path} is not a sweep diffbench can run: {problem}. A sweep names itself (name:), lists "
            "its parameters (each with value: or values: […]) and a command with ${args_no_hyphens}, "
            "as sweeps/all.yaml does; fix it, or pick another OBJ."
        )
    return Sweep.of(raw)


def learning_rate_sweep(sweep: Sweep) -> Sweep:
    """The same arms at each of LEARNING_RATES on seed LR_SEED alone: does an arm's rank hold up
    when the learning rate moves? optim.lr enters every trial's config, so each rate gets its
    own trial directory (config hash) and the rate is recorded in config.yaml."""
    parameters = {name: spec for name, spec in sweep.parameters.items() if name != "seed"}
    parameters["optim.lr"] = {"values": list(LEARNING_RATES)}
    parameters["seed"] = {"value": LR_SEED}
    return sweep.varied(f"{sweep.name}-{LR_OBJ}", parameters)


def tuning_sweep(
    sweep: Sweep, rates: list[float], seed: int, clips: Iterable[float | None] = TUNING_CLIPS
) -> Sweep:
    """Stage 1 of OBJ=tuned: the sweep's arms at every rate and clipping threshold on the tuning
    seed alone, trained without the final evaluation (TUNING_ONLY), so the choice reads
    validation data only."""
    parameters = {name: spec for name, spec in sweep.parameters.items() if name != "seed"}
    parameters["optim.lr"] = {"values": list(rates)}
    parameters[CLIP_KEY] = {"values": [CLIP_OFF if clip is None else clip for clip in clips]}
    parameters["seed"] = {"value": seed}
    parameters.update({key: {"value": value} for key, value in TUNING_ONLY.items()})
    return sweep.varied(f"{sweep.name}{STAGE1}", parameters)


def load_sweep(obj: str, of: str = "all") -> Sweep:
    """sweeps/<obj>.yaml, all.yaml narrowed to one experiment when obj names one, for obj=lr the
    sweep `of` (any other OBJ) at several learning rates, and for obj=tuned the sweep `of` itself
    (its stages are built from it by `tuning_sweep` and `tuned.stage_two`)."""
    for name in (obj, of):
        if not is_name(name):
            raise ConfigError(
                f"{name!r} is not a sweep name: OBJ (and LR_OF, TUNE_OF) take the name of a file in "
                f"sweeps/ or of an experiment, never a path. Valid values: {', '.join(valid_objs())}."
            )
    if obj in (LR_OBJ, TUNED_OBJ):
        if of in (LR_OBJ, TUNED_OBJ):
            knob = "LR_OF" if obj == LR_OBJ else "TUNE_OF"
            raise ConfigError(
                f"{knob}={of} cannot be the sweep OBJ={obj} works on; pick a sweep of arms, e.g. {knob}=grid."
            )
        base = load_sweep(of)
        return (
            learning_rate_sweep(base) if obj == LR_OBJ else base.varied(f"{base.name}-tuned", base.parameters)
        )
    path = sweeps_dir() / f"{obj}.yaml"
    if path.is_file():
        return read_sweep(path)
    if find_choice("experiment", obj) is not None:
        sweep = read_sweep(sweeps_dir() / "all.yaml")
        return sweep.varied(f"diffbench-{obj}", {**sweep.parameters, "experiment": {"values": [obj]}})
    raise ConfigError(
        f"unknown OBJ {obj!r}. Valid values: {', '.join(valid_objs())} "
        "(all, grid for every head × weighting, weightings for the eps head under each weighting, "
        "lr for the learning-rate check, tuned for every arm at its own tuned learning rate, a head, "
        "a weighting, or one experiment name), "
        "e.g. make sweep OBJ=eps."
    )


def parse_seeds(seeds: str) -> list[int]:
    """`3` means seeds 0, 1, 2; `0,5,7` lists them; anything selecting no seed, a seed twice or more
    than MAX_SEEDS seeds is refused."""
    try:
        values = [int(s) for s in seeds.replace(" ", "").split(",") if s]
    except ValueError:
        values = []
    if len(values) == 1 and "," not in seeds:
        chosen = list(range(values[0])) if 0 < values[0] <= MAX_SEEDS else []
    else:
        chosen = values
    if not chosen or min(chosen) < 0 or len(chosen) > MAX_SEEDS:
        raise ConfigError(
            f"SEEDS={seeds!r} selects no usable seeds: give a count from 1 to {MAX_SEEDS} (SEEDS=3 runs "
            "seeds 0, 1, 2) or a comma-separated list of non-negative seeds (SEEDS=0,5,7); "
            "nothing was started."
        )
    twice = sorted({s for s in chosen if chosen.count(s) > 1})
    if twice:
        raise ConfigError(
            f"SEEDS={seeds!r} names seed {', '.join(map(str, twice))} more than once: one seed is one run "
            "(the same numbers twice would be counted as two); nothing was started."
        )
    return chosen


def parse_rates(rates: str | None) -> list[float]:
    """RATES=1e-4,3e-4,1e-3,3e-3: at least two distinct positive finite rates, at most twelve."""
    if rates is None:
        return list(TUNING_RATES)
    try:
        values = sorted({float(r) for r in rates.replace(" ", "").split(",") if r})
    except ValueError:
        values = []
    names = {f"{v:.0e}" for v in values}
    if (
        len(names) < len(values)
        or not 2 <= len(values) <= 12
        or not all(math.isfinite(v) and 0 < v < 1 for v in values)
    ):
        raise ConfigError(
            f"RATES={rates!r} is not a list of 2 to 12 learning rates between 0 and 1 that differ in their "
            "first digit (each gets its own summary-…-lr<rate> table), e.g. RATES=1e-4,3e-4,1e-3,3e-3; "
            "nothing was started."
        )
    return values


def split_args(args: str, obj: str) -> list[str]:
    """ARGS as overrides, without the keys the sweep itself varies: a seed in ARGS would make every
    seed one run, a rate would undo OBJ=lr/tuned, and the tuning keys would let stage 1 look at
    another split (or stage 2 skip its evaluation)."""
    try:
        overrides = shlex.split(args)
    except ValueError as error:
        raise ConfigError(
            f"ARGS={args!r} cannot be split into overrides ({error}); close the quote."
        ) from None
    owned = {"seed": "SEEDS"}
    if obj in (LR_OBJ, TUNED_OBJ):
        owned["optim.lr"] = f"OBJ={obj}"
    if obj == TUNED_OBJ:
        owned.update({key: f"OBJ={TUNED_OBJ}" for key in (*TUNING_ONLY, CLIP_KEY)})
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key in owned:
            raise ConfigError(
                f"ARGS sets {key}, which {owned[key]} decides for every trial (as given, it would "
                f"{'make every seed one run' if key == 'seed' else 'undo what the sweep varies'}); "
                f"drop {key} from ARGS{' and use SEEDS' if key == 'seed' else ''}. Nothing was started."
            )
    return overrides


def hardware_args(gpus: int) -> list[str]:
    return [] if gpus <= 0 else ["trainer.accelerator=gpu", f"trainer.devices={gpus}", "trainer=gpu"]


def with_options(
    sweep: Sweep, profile: str | None, data: str | None, seeds: str | None, extra: list[str]
) -> Sweep:
    """The sweep with the make variables folded in, so every launcher sees one grid."""
    parameters = dict(sweep.parameters)
    if profile:
        parameters["profile"] = {"value": profile}
    if data:
        parameters["data"] = {"value": data}
    if seeds is not None:
        parameters["seed"] = {"values": parse_seeds(seeds)}
    command = sweep.command
    if extra:
        marker = command.index(ARGS_MACRO) + 1
        command = (*command[:marker], *extra, *command[marker:])
    return replace(sweep, parameters=parameters, command=command)


def configure(options: SweepOptions) -> Sweep:
    """The sweep OBJ names, with ARGS (less what the sweep varies), the GPUs and run.reuse in
    every trial's command."""
    extra = split_args(options.args, options.obj) + hardware_args(options.gpus) + ["run.reuse=true"]
    sweep = load_sweep(options.obj, options.of)
    return with_options(sweep, options.profile, options.data, options.seeds, extra)


BUDGET_KEY = "trainer.max_steps"


def at_budget(sweep: Sweep, steps: int) -> Sweep:
    """The same sweep with every trial trained for `steps` steps: any budget ARGS gave is replaced
    (last in the command, so it wins for the local runner and W&B agents alike). Each trial's
    directory changes with its budget, and a longer one continues the shorter finished trial."""
    kept = tuple(word for word in sweep.command if word.partition("=")[0].lstrip("+~") != BUDGET_KEY)
    return replace(sweep, command=(*kept, f"{BUDGET_KEY}={steps}"))


def overrides_of(command: Iterable[str]) -> list[str]:
    """The `key=value` words of a trial command: what the run command composes."""
    return [part for part in command if "=" in part]


def trials_at(sweep: Sweep, points: list[Point], check: Check, here: bool = True) -> list[Trial]:
    """The trials of these points, each checked as the run command would check it (so a setting any
    trial rejects stops the sweep before the first starts) and found in its directory (named by
    its resolved config, see run.reuse); points that resolve to one run (the same settings reached
    by two names) make one trial, which names the others in `same`."""
    found: dict[Path, Trial] = {}
    for point in points:
        command = sweep.command_of(point)
        try:
            spec = check(overrides_of(command), here)
        except ConfigError as error:
            raise ConfigError(f"trial {point_label(point)} would be refused: {error}") from None
        directory = trial_dir(spec)
        kept = found.get(directory)
        if kept is None:
            found[directory] = Trial(point, spec, tuple(command), directory)
        else:
            found[directory] = replace(kept, same=(*kept.same, point))
    return list(found.values())


def plan(sweep: Sweep, options: SweepOptions, check: Check) -> list[Trial]:
    """Every distinct trial of the sweep's grid, each checked before any starts."""
    return trials_at(sweep, sweep.grid(), check, options.here)


class Setting(NamedTuple):
    """The optimiser setting of one summary table: a learning rate and a clipping threshold (None: off)."""

    rate: float
    clip: float | None = None

    @property
    def text(self) -> str:
        return f"optim.lr={self.rate:g}" + ("" if self.clip is None else f" {CLIP_KEY}={self.clip:g}")


def setting_of(trial: Trial) -> Setting | None:
    """The point's optimiser setting, None where the sweep does not vary optim.lr."""
    if "optim.lr" not in trial.point:
        return None
    clip = trial.point.get(CLIP_KEY, CLIP_OFF)
    return Setting(float(trial.point["optim.lr"]), None if clip in (CLIP_OFF, None) else float(clip))


def summary_sets(trials: list[Trial]) -> list[tuple[Setting | None, list[Trial]]]:
    """The trials of each summary table: all of them (None), or one table per optimiser setting
    when the trials vary it, since a table pools an arm's trials as if they were seeds."""
    settings = list(dict.fromkeys(setting_of(t) for t in trials))
    if len(settings) < 2:
        return [(None, trials)]
    return [(setting, [t for t in trials if setting_of(t) == setting]) for setting in settings]


def summary_stem(sweep: Sweep, setting: Setting | None) -> str:
    """`summary-<sweep name>[-lr<rate>[-clip<threshold>]]`, numbers written without a dot (3e-04)
    so that they are not taken for the file's extension."""
    if setting is None:
        return f"{SUMMARY_NAME}-{sweep.name}"
    clip = "" if setting.clip is None else f"-clip{setting.clip:.0e}"
    return f"{SUMMARY_NAME}-{sweep.name}-lr{setting.rate:.0e}{clip}"
