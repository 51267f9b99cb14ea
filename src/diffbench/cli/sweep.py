"""`make sweep OBJ=…`: every arm × seed from a YAML in `sweeps/`, through W&B sweeps when
logged in and through the local runner otherwise — the same grid and the same command.
`OBJ=lr` is no YAML: it reruns another sweep's arms at several learning rates (`learning_rate_sweep`)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from diffbench import atomic
from diffbench.analysis.collect import load_run
from diffbench.analysis.optimiser import default_rate
from diffbench.analysis.summary import summarize_trials
from diffbench.analysis.tuning import FAMILIES, TUNING_ONLY, Choice, choose, trial_of, tuning_record
from diffbench.cli.checks import check_settings
from diffbench.cli.report import main as report_main
from diffbench.config import ConfigError, available, compose, find_choice, is_name, yaml_problem
from diffbench.launch import (
    STOP,
    STOP_SIGNALS,
    SlurmOptions,
    TrialJob,
    cpu_share,
    forward_stop_signals,
    gpu_slots,
    on_slots,
    run_local_jobs,
    run_trial,
    submit_slurm,
    trial_env,
    visible_gpus,
)
from diffbench.rundir import DIVERGED, RESULTS, SWEEP_LOG, RunDir, runs_root, trial_dir, trials_root
from diffbench.tracking import wandb_online

SUMMARY_NAME = "summary"
LR_OBJ = "lr"
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
"""optim.lr of the learning-rate check: the default 1e-3 and a factor of about 3 either side."""
LR_SEED = 0
TUNED_OBJ = "tuned"
TUNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3)
"""Stage 1 of OBJ=tuned: four log-spaced rates, a factor of 3 to 10 around the default 1e-3."""
TUNING_SEED = 100
STAGE1 = "-stage1"
"""The seed the rates are chosen on: outside every evaluation seed, so selection cannot bias a test."""


def sweeps_dir() -> Path:
    """`$DIFFBENCH_SWEEPS`, else `./sweeps` of the working directory, else this checkout's `sweeps/`."""
    env = os.environ.get("DIFFBENCH_SWEEPS")
    if env:
        return Path(env)
    local = Path.cwd() / "sweeps"
    return local if local.is_dir() else Path(__file__).resolve().parents[3] / "sweeps"


def valid_objs() -> list[str]:
    return sorted([*(p.stem for p in sweeps_dir().glob("*.yaml")), LR_OBJ, TUNED_OBJ]) + available(
        "experiment"
    )


def learning_rate_sweep(sweep: dict) -> dict:
    """The same arms at each of LEARNING_RATES on seed LR_SEED alone: does an arm's rank hold up
    when the learning rate moves? optim.lr enters every trial's config, so each rate gets its
    own trial directory (config hash) and the rate is recorded in config.yaml."""
    parameters = {name: spec for name, spec in sweep["parameters"].items() if name != "seed"}
    parameters["optim.lr"] = {"values": list(LEARNING_RATES)}
    parameters["seed"] = {"value": LR_SEED}
    return {**sweep, "name": f"{sweep['name']}-{LR_OBJ}", "parameters": parameters}


def tuning_sweep(sweep: dict, rates: list[float], seed: int) -> dict:
    """Stage 1 of OBJ=tuned: the sweep's arms at every rate on the tuning seed alone, trained
    without the final evaluation (TUNING_ONLY), so the choice reads validation data only."""
    parameters = {name: spec for name, spec in sweep["parameters"].items() if name != "seed"}
    parameters["optim.lr"] = {"values": list(rates)}
    parameters["seed"] = {"value": seed}
    parameters.update({key: {"value": value} for key, value in TUNING_ONLY.items()})
    return {**sweep, "name": f"{sweep['name']}{STAGE1}", "parameters": parameters}


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


def sweep_problem(sweep: object) -> str | None:
    """What keeps a loaded sweep file from being a grid this runner (and `wandb sweep`) can run."""
    if not isinstance(sweep, dict):
        return "it is not a mapping of sweep settings"
    missing = [key for key in ("name", "parameters", "command") if key not in sweep]
    if missing:
        return f"it has no {', '.join(missing)}"
    if not isinstance(sweep["command"], list) or "${args_no_hyphens}" not in sweep["command"]:
        return "its command: is not a list holding ${args_no_hyphens}"
    parameters = sweep["parameters"]
    if not isinstance(parameters, dict) or not parameters:
        return "its parameters: is not a mapping of names to {value: …} or {values: […]}"
    for name, spec in parameters.items():
        values = spec.get("values") if isinstance(spec, dict) else None
        if not (isinstance(spec, dict) and ("value" in spec or (isinstance(values, list) and values))):
            return f"parameter {name!r} has neither value: nor a non-empty values: list"
    return None


def read_sweep(path: Path) -> dict:
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{path} is not valid YAML ({yaml_problem(error)}); fix it, or pick another OBJ."
        ) from None
    problem = sweep_problem(sweep)
    if problem:
        raise ConfigError(
            f"{path} is not a sweep diffbench can run: {problem}. A sweep names itself (name:), lists "
            "its parameters (each with value: or values: […]) and a command with ${args_no_hyphens}, "
            "as sweeps/all.yaml does; fix it, or pick another OBJ."
        )
    return sweep


def load_sweep(obj: str, of: str = "all") -> dict:
    """sweeps/<obj>.yaml, all.yaml narrowed to one experiment when obj names one, for obj=lr the
    sweep `of` (any other OBJ) at several learning rates, and for obj=tuned the sweep `of` itself
    (its stages are built from it by `tuning_sweep` and `tuned_points`)."""
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
        return learning_rate_sweep(base) if obj == LR_OBJ else {**base, "name": f"{base['name']}-tuned"}
    path = sweeps_dir() / f"{obj}.yaml"
    if path.is_file():
        return read_sweep(path)
    if find_choice("experiment", obj) is not None:
        sweep = read_sweep(sweeps_dir() / "all.yaml")
        sweep["name"] = f"diffbench-{obj}"
        sweep["parameters"]["experiment"] = {"values": [obj]}
        return sweep
    raise ConfigError(
        f"unknown OBJ {obj!r}. Valid values: {', '.join(valid_objs())} "
        "(all, grid for every head × weighting, weightings for the eps head under each weighting, "
        "lr for the learning-rate check, tuned for every arm at its own tuned learning rate, a head, "
        "a weighting, or one experiment name), "
        "e.g. make sweep OBJ=eps."
    )


MAX_SEEDS = 1000
"""More seeds than any sweep here needs: a larger count is a typo (and would compose for hours)."""
MAX_TRIALS = 20_000


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
        owned.update({key: f"OBJ={TUNED_OBJ}" for key in TUNING_ONLY})
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key in owned:
            raise ConfigError(
                f"ARGS sets {key}, which {owned[key]} decides for every trial (as given, it would "
                f"{'make every seed one run' if key == 'seed' else 'undo what the sweep varies'}); "
                f"drop {key} from ARGS{' and use SEEDS' if key == 'seed' else ''}. Nothing was started."
            )
    return overrides


COUNTS = {
    "gpus": 0,
    "trials_per_gpu": 1,
    "jobs": 0,
    "agents": 0,
    "time": 1,
    "cpus": 1,
    "array_parallelism": 0,
}
"""The smallest value of each numeric sweep option."""


def check_counts(options: argparse.Namespace) -> None:
    for name, least in COUNTS.items():
        value = getattr(options, name)
        if value < least:
            raise ConfigError(
                f"{name.upper()}={value} is not a count this sweep can use: it must be at least {least} "
                f"(README's Sweeps table says what it means); nothing was started."
            )


def apply_options(
    sweep: dict, profile: str | None, data: str | None, seeds: str | None, extra: list[str]
) -> dict:
    """The YAML with the make variables folded in, so both runners see one grid."""
    params = sweep["parameters"]
    if profile:
        params["profile"] = {"value": profile}
    if data:
        params["data"] = {"value": data}
    if seeds is not None:
        params["seed"] = {"values": parse_seeds(seeds)}
    if extra:
        marker = sweep["command"].index("${args_no_hyphens}")
        sweep["command"] = [*sweep["command"][: marker + 1], *extra, *sweep["command"][marker + 1 :]]
    return sweep


def expand_grid(sweep: dict) -> list[dict[str, object]]:
    """Every grid point as {parameter: value}, in the YAML's order; counted before it is built."""
    names, choices = [], []
    for name, spec in sweep["parameters"].items():
        names.append(name)
        choices.append(spec["values"] if "values" in spec else [spec["value"]])
    count = math.prod(len(c) for c in choices)
    if count > MAX_TRIALS:
        raise ConfigError(
            f"the sweep {sweep['name']} has {count} trials, more than {MAX_TRIALS}; narrow its "
            "parameters (or SEEDS). Nothing was started."
        )
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def trial_command(sweep: dict, point: dict[str, object]) -> list[str]:
    """The sweep's `command` with W&B's macros filled in, as `wandb agent` would run it."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in point.items()}})["args_no_hyphens"]
    command: list[str] = []
    for part in sweep["command"]:
        if part == "${env}":
            continue
        if part == "${interpreter}":
            command.append(sys.executable)
        elif part == "${program}":
            command.append(sweep["program"])
        elif part == "${args_no_hyphens}":
            command.extend(args)
        else:
            command.append(part)
    return command


def trial_overrides(command: list[str]) -> list[str]:
    return [part for part in command if "=" in part]


def hardware_args(gpus: int) -> list[str]:
    return [] if gpus <= 0 else ["trainer.accelerator=gpu", f"trainer.devices={gpus}", "trainer=gpu"]


def run_local(
    sweep: dict,
    points: list[dict[str, object]],
    dirs: list[Path],
    env: dict[str, str],
    slots: list[str | None],
) -> list[dict]:
    """Run every trial's command, one per slot at a time (a slot is a GPU group, or None for a
    CPU trial); each trial gets its slot's GPUs and its share of the cores, and with more than one
    slot its output goes to <trial dir>/sweep.log. Finished trials return at once (run.reuse)."""
    threads = cpu_share(len(slots))
    lock = threading.Lock()
    done: list[dict] = []

    def one(index: int, slot: str | None) -> dict:
        point = points[index]
        label = " ".join(f"{k}={v}" for k, v in point.items())
        log = dirs[index] / SWEEP_LOG if len(slots) > 1 else None
        with lock:
            where = (f" on GPU {slot}" if slot is not None else "") + (f" (log: {log})" if log else "")
            print(f"[sweep] trial {index + 1}/{len(points)} started: {label}{where}", flush=True)
        start = time.perf_counter()
        code = run_trial(trial_command(sweep, point), trial_env(env, slot, threads), log)
        outcome = {"point": point, "returncode": code, "seconds": time.perf_counter() - start}
        with lock:
            done.append(outcome)
            status = "done" if code == 0 else f"FAILED (exit code {code})"
            if (RunDir(dirs[index]).read_results() or {}).get("status") == DIVERGED:
                status = f"DIVERGED (no metrics; {dirs[index] / RESULTS} says where)"
            print(
                f"[sweep] trial {index + 1}/{len(points)} {status} in {outcome['seconds']:.0f} s: {label} "
                f"[{len(done)}/{len(points)} finished]",
                flush=True,
            )
        return outcome

    return on_slots(len(points), slots, one)


def run_wandb(sweep: dict, slots: list[str | None], env: dict[str, str]) -> None:
    """Create the W&B sweep from the YAML and run one CLI agent per slot, each pinned to its GPUs.
    More machines join the same sweep with `wandb agent <entity>/<project>/<sweep id>`."""
    import wandb

    project = env.get("WANDB_PROJECT", "diffbench")
    sweep_id = wandb.sweep(sweep=sweep, project=project, entity=env.get("WANDB_ENTITY"))
    target = (
        f"{env['WANDB_ENTITY']}/{project}/{sweep_id}" if env.get("WANDB_ENTITY") else f"{project}/{sweep_id}"
    )
    print(f"[sweep] W&B sweep {target}: {len(slots)} agent(s) here; more machines: `wandb agent {target}`")
    threads = cpu_share(len(slots))
    procs = [
        subprocess.Popen(["wandb", "agent", target], env=trial_env(env, slot, threads)) for slot in slots
    ]
    for proc in procs:
        proc.wait()


def trial_dirs(sweep: dict, points: list[dict[str, object]], here: bool = True) -> list[Path]:
    """Where each grid point's run lives (named by its resolved config, see run.reuse), every
    trial checked as the run command would check it, so a setting any trial rejects stops the
    sweep before the first one starts."""
    dirs = []
    for point in points:
        try:
            spec = check_settings(compose(trial_overrides(trial_command(sweep, point))), here)
        except ConfigError as error:
            label = " ".join(f"{k}={v}" for k, v in point.items())
            raise ConfigError(f"trial {label} would be refused: {error}") from None
        dirs.append(trial_dir(spec))
    return dirs


def distinct_trials(
    points: list[dict[str, object]], dirs: list[Path]
) -> tuple[list[dict[str, object]], list[Path]]:
    """Grid points that resolve to one run (the same settings reached by two names) run once and
    count once; the others are named, so the smaller trial count is no surprise."""
    first: dict[Path, dict[str, object]] = {}
    for point, path in zip(points, dirs):
        if path in first:
            same = " ".join(f"{k}={v}" for k, v in point.items())
            kept = " ".join(f"{k}={v}" for k, v in first[path].items())
            print(f"[sweep] {same} is the same run as {kept} (identical settings); it runs and counts once")
        else:
            first[path] = point
    return list(first.values()), list(first)


def summary_sets(points: list[dict[str, object]], dirs: list[Path]) -> list[tuple[float | None, list[Path]]]:
    """The trials of each summary table: all of them (rate None), or one table per learning rate
    when the grid varies optim.lr, since a table pools an arm's trials as if they were seeds."""
    rates = list(dict.fromkeys(point["optim.lr"] for point in points if "optim.lr" in point))
    if len(rates) < 2:
        return [(None, dirs)]
    return [
        (rate, [d for point, d in zip(points, dirs, strict=True) if point["optim.lr"] == rate])
        for rate in rates
    ]


def summary_stem(sweep: dict, rate: float | None) -> str:
    """`summary-<sweep name>[-lr<rate>]`, the rate written without a dot (3e-04) so that it is not
    taken for the file's extension."""
    return f"{SUMMARY_NAME}-{sweep['name']}" + ("" if rate is None else f"-lr{rate:.0e}")


LAUNCHERS = ("local", "local-jobs", "slurm")


def slots_for(gpus: int, trials_per_gpu: int, jobs: int) -> list[str | None]:
    """Trials that run at once: one per GPU group slot, or `jobs` CPU trials (2 by default)."""
    if gpus <= 0:
        return [None] * (jobs or min(2, os.cpu_count() or 1))
    return list(gpu_slots(visible_gpus(), gpus, trials_per_gpu))


def agent_slots(slots: list[str | None], gpus: int, agents: int) -> list[str | None]:
    """The W&B agents started here: by default one per GPU slot (every GPU of the node busy), one on
    the CPU; `agents` lowers it (or, on the CPU, sets it)."""
    if gpus <= 0:
        return [None] * (agents or 1)
    return slots[: agents or len(slots)]


def finish(sweep: dict, points: list[dict[str, object]], dirs: list[Path], start: float) -> int:
    """The summary table(s) and the report of the trials, and whether any is still incomplete."""
    for rate, subset in summary_sets(points, dirs):
        if rate is not None:
            print(f"[sweep] optim.lr={rate:g}")
        print(summarize_trials(subset, trials_root(dirs[0]) / summary_stem(sweep, rate)))
    print(f"[sweep] wall time {time.perf_counter() - start:.0f} s")
    report_main(["--runs", str(trials_root(dirs[0])), "--out", str(runs_root(dirs[0]) / "report")])
    incomplete = [d for d in dirs if not (d / RESULTS).is_file()]
    if incomplete:
        print(
            f"[sweep] {len(incomplete)} trial(s) incomplete; run the same command again to resume them.",
            file=sys.stderr,
        )
        return 1
    return 0


def trial_jobs(
    sweep: dict, points: list[dict[str, object]], dirs: list[Path], env: dict[str, str]
) -> list[TrialJob]:
    """Every trial as a submitit job: the same command the local runner runs, with the settings
    this command decided (W&B mode) on top of the environment the job finds where it runs."""
    overrides = tuple((k, v) for k, v in env.items() if k == "WANDB_MODE")
    return [
        TrialJob(tuple(trial_command(sweep, p)), overrides, str(d / SWEEP_LOG)) for p, d in zip(points, dirs)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbench.sweep", description=__doc__)
    parser.add_argument(
        "--obj",
        default="all",
        help="all | grid | weightings | lr | tuned | eps | x0 | score | simple | elbo | an experiment name",
    )
    parser.add_argument(
        "--lr-of", default=None, help=f"with --obj {LR_OBJ}: the sweep whose arms are checked (default all)"
    )
    parser.add_argument(
        "--tune-of",
        default=None,
        help=f"with --obj {TUNED_OBJ}: the sweep whose arms are tuned (default all)",
    )
    parser.add_argument(
        "--rates",
        default=None,
        help=f"with --obj {TUNED_OBJ}: stage 1's learning rates (default {','.join(map(str, TUNING_RATES))})",
    )
    parser.add_argument("--profile", default=None, help="smoke | default | full (budget of each trial)")
    parser.add_argument("--data", default=None, help="dataset config name, e.g. digits or gmm")
    parser.add_argument("--seeds", default=None, help="a count (3 → 0,1,2) or a list (0,4,7)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per trial (DDP inside a trial); 0 = CPU")
    parser.add_argument(
        "--trials-per-gpu", type=int, default=1, help="trials sharing one GPU (group) at once"
    )
    parser.add_argument("--jobs", type=int, default=0, help="CPU trials at once (0: 2 on CPU)")
    parser.add_argument(
        "--agents", type=int, default=0, help="W&B agents here (0: one per GPU slot, 1 on CPU)"
    )
    parser.add_argument(
        "--launcher", default="local", choices=LAUNCHERS, help="local runner, local-jobs or slurm"
    )
    parser.add_argument(
        "--wait", action="store_true", help="slurm: wait for the array, then write the report"
    )
    parser.add_argument("--partition", default=None, help="slurm: partition")
    parser.add_argument(
        "--time", type=int, default=240, help="slurm: minutes per trial job (requeued on timeout)"
    )
    parser.add_argument(
        "--array-parallelism", type=int, default=0, help="slurm: array tasks at once (0: all)"
    )
    parser.add_argument("--cpus", type=int, default=4, help="slurm: CPU cores per trial (its torch threads)")
    parser.add_argument(
        "--args", default="", help="extra overrides for every trial, e.g. 'trainer.max_steps=500'"
    )
    parser.add_argument(
        "--local", action="store_true", help="use the local runner even when logged in to W&B"
    )
    options = parser.parse_args(argv)
    try:
        for name, value, obj in (("LR_OF", options.lr_of, LR_OBJ), ("TUNE_OF", options.tune_of, TUNED_OBJ)):
            if value is not None and options.obj != obj:
                raise ConfigError(f"{name}={value} only applies to OBJ={obj}; drop it or set OBJ={obj}.")
        if options.rates is not None and options.obj != TUNED_OBJ:
            raise ConfigError(f"RATES only applies to OBJ={TUNED_OBJ}; drop it or set OBJ={TUNED_OBJ}.")
        check_counts(options)
        extra = split_args(options.args, options.obj) + hardware_args(options.gpus) + ["run.reuse=true"]
        of = next((v for v in (options.lr_of, options.tune_of) if v is not None), "all")
        sweep = load_sweep(options.obj, of)
        sweep = apply_options(sweep, options.profile, options.data, options.seeds, extra)
        points = expand_grid(sweep)
        slots = (
            [None]
            if options.launcher == "slurm"
            else slots_for(options.gpus, options.trials_per_gpu, options.jobs)
        )
        here = options.launcher != "slurm"
        points, dirs = distinct_trials(points, trial_dirs(sweep, points, here))
        stage1 = None
        if options.obj == TUNED_OBJ:
            if any(point["seed"] == TUNING_SEED for point in points):
                raise ConfigError(
                    f"SEEDS includes {TUNING_SEED}, the seed OBJ={TUNED_OBJ} chooses the learning rates on: "
                    "a test on the seed that chose the rate is biased in its favour. Pick evaluation seeds "
                    f"without {TUNING_SEED}; nothing was started."
                )
            tuning = tuning_sweep(sweep, parse_rates(options.rates), TUNING_SEED)
            grid = expand_grid(tuning)
            stage1 = (tuning, *distinct_trials(grid, trial_dirs(tuning, grid, here)))
    except ConfigError as error:
        print(f"diffbench.sweep: {error}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    start = time.perf_counter()
    if options.obj == TUNED_OBJ:
        return run_tuned(options, sweep, points, dirs, stage1, env, slots, start)
    code = execute(options, sweep, points, dirs, env, slots, wandb_sweep=True)
    return finish(sweep, points, dirs, start) if code is None else code


def execute(
    options: argparse.Namespace,
    sweep: dict,
    points: list[dict[str, object]],
    dirs: list[Path],
    env: dict[str, str],
    slots: list[str | None],
    wandb_sweep: bool,
) -> int | None:
    """Run the trials with the chosen launcher: None once every trial has run here (the summary
    comes next), else the exit code (a stop signal, or a SLURM array left running)."""
    if options.launcher != "local":
        return launch_jobs(options, sweep, points, dirs, env, slots)
    online = (
        wandb_sweep
        and not options.local
        and os.environ.get("WANDB_MODE", "online") == "online"
        and wandb_online()
    )
    print(
        f"[sweep] {sweep['name']}: {len(points)} trials, "
        f"{'W&B sweep' if online else 'local runner, W&B offline'}, {len(slots)} at once"
    )
    if online:
        try:
            run_wandb(sweep, agent_slots(slots, options.gpus, options.agents), env)
        except Exception as error:  # any W&B failure (auth, network, server) must not end the sweep
            print(
                f"[sweep] W&B sweep could not start ({type(error).__name__}: {error}); "
                "running the same trials with the local runner, W&B offline.",
                file=sys.stderr,
            )
            online = False
    if not online:
        if env.get("WANDB_MODE", "online") == "online":
            env["WANDB_MODE"] = "offline"
        forward_stop_signals()
        run_local(sweep, points, dirs, env, slots)
    if STOP.is_set():
        signum = STOP_SIGNALS[0]
        print(
            f"[sweep] stopped by {signal.Signals(signum).name}: the running trials saved their step and "
            "stopped, no further trial started; run the same command again to resume them.",
            file=sys.stderr,
        )
        return 128 + signum
    return None


def launch_jobs(
    options: argparse.Namespace,
    sweep: dict,
    points: list[dict[str, object]],
    dirs: list[Path],
    env: dict[str, str],
    slots: list[str | None],
) -> int | None:
    """The trials as submitit jobs: separate local jobs (waited for), or a SLURM job array (waited
    for with --wait; otherwise the command says what to run when the array ends)."""
    if env.get("WANDB_MODE", "online") == "online" and not wandb_online():
        env["WANDB_MODE"] = "offline"
    root = runs_root(dirs[0])
    jobs = trial_jobs(sweep, points, dirs, env)
    if options.launcher == "local-jobs":
        print(f"[sweep] {sweep['name']}: {len(points)} trials as local jobs, {len(slots)} at once")

        def report(index: int, job: TrialJob, state: str) -> None:
            label = " ".join(f"{k}={v}" for k, v in points[index].items())
            print(f"[sweep] job {index + 1}/{len(points)} {state}: {label} (log: {job.log})", flush=True)

        run_local_jobs(jobs, root, slots, report)
        return None
    slurm = SlurmOptions(
        options.partition, options.time, options.gpus, options.cpus, options.array_parallelism or len(jobs)
    )
    try:
        submitted = submit_slurm(jobs, root, slurm)
    except RuntimeError as error:  # submitit's word for "no SLURM here" (no sbatch/srun on PATH)
        print(
            f"diffbench.sweep: LAUNCHER=slurm could not submit the array ({error}). Run the command "
            "on a SLURM login node, or use LAUNCHER=local-jobs on this machine.",
            file=sys.stderr,
        )
        return 2
    array = submitted[0].job_id.split("_")[0] if submitted else "?"
    print(
        f"[sweep] {sweep['name']}: {len(jobs)} trials submitted as SLURM job array {array} "
        f"(logs under {root / 'submitit'}); preempted or timed-out trials are requeued and resume."
    )
    if not options.wait:
        then = (
            "run the same command again (it chooses the rates and submits stage 2)"
            if sweep["name"].endswith(STAGE1)
            else f"make report  (or python -m diffbench.report --runs {root})"
        )
        print(f"[sweep] when the array has finished: {then}")
        return 0
    for job in submitted:
        try:
            job.result()
        except Exception as error:  # a failed trial is listed by the report, not fatal to the others
            print(f"[sweep] job {job.job_id} failed: {error}", file=sys.stderr)
    return None


def run_tuned(
    options: argparse.Namespace,
    sweep: dict,
    points: list[dict[str, object]],
    dirs: list[Path],
    stage1: tuple[dict, list[dict[str, object]], list[Path]],
    env: dict[str, str],
    slots: list[str | None],
    start: float,
) -> int:
    """OBJ=tuned: stage 1 on the tuning seed, each arm's rate per family from its validation
    metrics, then stage 2: every arm on the evaluation seeds at the default and its chosen rates."""
    tuning, tuning_points, tuning_dirs = stage1
    rates = tuning["parameters"]["optim.lr"]["values"]
    pending = [i for i, d in enumerate(tuning_dirs) if trial_of(load_run(d)) is None]
    print(
        f"[sweep] stage 1: {len(tuning_points)} trials ({len(pending)} to run), every arm at optim.lr "
        f"{', '.join(map(str, rates))} on tuning seed {TUNING_SEED} (no final evaluation; budget metrics "
        "against validation images)"
    )
    if pending:
        todo = ([tuning_points[i] for i in pending], [tuning_dirs[i] for i in pending])
        code = execute(options, tuning, *todo, env, slots, wandb_sweep=False)
        if code is not None:
            return code
    found = [trial_of(load_run(d)) for d in tuning_dirs]
    trials = [t for t in found if t is not None]
    if len(trials) < len(found):
        print(
            f"[sweep] {len(found) - len(trials)} stage-1 trial(s) neither finished nor diverged; run the "
            "same command again to resume them (stage 2 needs every rate of every arm).",
            file=sys.stderr,
        )
        return 1
    default = default_rate()
    choices = {family: choose(trials, family, default) for family in FAMILIES}
    record = tuning_record(trials, choices, TUNING_SEED, default)
    stem = trials_root(tuning_dirs[0]) / f"tuning-{sweep['name']}"
    atomic.write_text(stem.with_suffix(".json"), json.dumps(record.payload, indent=2) + "\n")
    atomic.write_text(stem.with_suffix(".md"), record.markdown)
    print(record.markdown)
    print(f"[sweep] rate choice written to {stem}.md and .json")
    try:
        stage2, stage2_dirs = tuned_points(sweep, points, dirs, choices, default, options.launcher != "slurm")
    except ConfigError as error:
        print(f"diffbench.sweep: {error}", file=sys.stderr)
        return 2
    print(
        f"[sweep] stage 2: {len(stage2)} trials, every arm on seeds "
        f"{', '.join(sorted({str(p['seed']) for p in stage2}))} at the default and its chosen rates"
    )
    code = execute(options, sweep, stage2, stage2_dirs, env, slots, wandb_sweep=False)
    return finish(sweep, stage2, stage2_dirs, start) if code is None else code


def tuned_points(
    sweep: dict,
    points: list[dict[str, object]],
    dirs: list[Path],
    choices: dict[str, dict[str, Choice]],
    default: float,
    here: bool = True,
) -> tuple[list[dict[str, object]], list[Path]]:
    """Every evaluation trial at the shared default rate (the very trials the plain sweep runs) and
    at each rate chosen for its arm; a trial directory's parent is its arm (`rundir.trial_dir`)."""
    stage2: list[dict[str, object]] = []
    for point, path in zip(points, dirs, strict=True):
        chosen = {c.rate for family in choices.values() if (c := family.get(path.parent.name)) and c.rate}
        stage2 += [{**point, "optim.lr": rate} for rate in sorted({default, *chosen})]
    return stage2, trial_dirs(sweep, stage2, here)


if __name__ == "__main__":
    sys.exit(main())
