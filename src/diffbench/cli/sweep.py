"""`make sweep OBJ=…`: every arm × seed from a YAML in `sweeps/`, through W&B sweeps when
logged in and through the local runner otherwise — the same grid and the same command.
`OBJ=lr` is no YAML: it reruns another sweep's arms at several learning rates. `UNTIL=settled`
doubles every trial's budget (each trial continuing its shorter self) until the headlines settle."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from diffbench import launch, tuned, until
from diffbench.analysis.summary import summarize_trials
from diffbench.cli.checks import check_settings
from diffbench.cli.report import main as report_main
from diffbench.config import ConfigError, compose
from diffbench.launch import LAUNCHERS, LaunchOptions, Outcome
from diffbench.plan import (
    LR_OBJ,
    TUNED_OBJ,
    TUNING_RATES,
    Sweep,
    SweepOptions,
    Trial,
    configure,
    plan,
    point_label,
    summary_sets,
    summary_stem,
)
from diffbench.rundir import RESULTS, runs_root, trials_root
from diffbench.spec import RunSpec


def run_check(overrides: list[str], here: bool) -> RunSpec:
    """A trial's overrides checked as `python -m diffbench.run` checks its command line."""
    return check_settings(compose(overrides), here)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m diffbench.sweep", description=__doc__)
    add = parser.add_argument
    add(
        "--obj",
        default="all",
        help="all | grid | weightings | lr | tuned | eps | x0 | score | simple | elbo | an experiment name",
    )
    add("--lr-of", default=None, help=f"with --obj {LR_OBJ}: the sweep whose arms are checked (default all)")
    add(
        "--tune-of",
        default=None,
        help=f"with --obj {TUNED_OBJ}: the sweep whose arms are tuned (default all)",
    )
    add(
        "--rates",
        default=None,
        help=f"with --obj {TUNED_OBJ}: stage 1's learning rates (default {','.join(map(str, TUNING_RATES))})",
    )
    add("--profile", default=None, help="smoke | default | full (budget of each trial)")
    add("--data", default=None, help="dataset config name, e.g. digits or gmm")
    add("--seeds", default=None, help="a count (3 → 0,1,2) or a list (0,4,7)")
    add("--gpus", type=int, default=0, help="GPUs per trial (DDP inside a trial); 0 = CPU")
    add("--trials-per-gpu", type=int, default=1, help="trials sharing one GPU (group) at once")
    add("--jobs", type=int, default=0, help="CPU trials at once (0: 2 on CPU)")
    add("--agents", type=int, default=0, help="W&B agents here (0: one per GPU slot, 1 on CPU)")
    add("--launcher", default="local", choices=LAUNCHERS, help="local runner, local-jobs or slurm")
    add("--wait", action="store_true", help="slurm: wait for the array, then write the report")
    add("--partition", default=None, help="slurm: partition")
    add("--time", type=int, default=240, help="slurm: minutes per trial job (requeued on timeout)")
    add("--array-parallelism", type=int, default=0, help="slurm: array tasks at once (0: all)")
    add("--cpus", type=int, default=4, help="slurm: CPU cores per trial (its torch threads)")
    add("--args", default="", help="extra overrides for every trial, e.g. 'trainer.max_steps=500'")
    add("--local", action="store_true", help="use the local runner even when logged in to W&B")
    add(
        "--until",
        default=None,
        help=f"{until.SETTLED}: double every trial's budget until the headlines settle",
    )
    add(
        "--max-steps",
        default=None,
        help=f"with --until: the largest budget a round may train (default {until.DEFAULT_MAX_STEPS})",
    )
    return parser


def refuse(error: ConfigError) -> int:
    print(f"diffbench.sweep: {error}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        for name, value, obj in (("LR_OF", args.lr_of, LR_OBJ), ("TUNE_OF", args.tune_of, TUNED_OBJ)):
            if value is not None and args.obj != obj:
                raise ConfigError(f"{name}={value} only applies to OBJ={obj}; drop it or set OBJ={obj}.")
        if args.rates is not None and args.obj != TUNED_OBJ:
            raise ConfigError(f"RATES only applies to OBJ={TUNED_OBJ}; drop it or set OBJ={TUNED_OBJ}.")
        options = LaunchOptions(**{f.name: getattr(args, f.name) for f in fields(LaunchOptions)})
        max_steps = until.goal(args.until, args.max_steps, args.obj, options)
        of = next((v for v in (args.lr_of, args.tune_of) if v is not None), "all")
        wanted = SweepOptions(
            args.obj, of, args.profile, args.data, args.seeds, args.args, args.gpus, args.rates, options.here
        )
        sweep = configure(wanted)
        options.slots()  # GPUS this machine lacks are refused before any trial is checked
        trials = plan(sweep, wanted, run_check)
        for trial in trials:
            for other in trial.same:
                print(
                    f"[sweep] {point_label(other)} is the same run as {trial.label} (identical settings); "
                    "it runs and counts once"
                )
        stages = tuned.prepare(sweep, trials, wanted, run_check) if args.obj == TUNED_OBJ else None
        if max_steps is not None:
            until.first_budget(trials, max_steps)
    except ConfigError as error:
        return refuse(error)
    start = time.perf_counter()
    try:
        if max_steps is not None:
            rounds = until.run(sweep, trials, options, run_check, max_steps)
            code = ended(rounds.outcome, sweep, rounds.trials, start)
            if rounds.rounds:
                print(rounds.markdown(), end="")
                print(f"[until] written to {rounds.record}.md and .json")
            return code
        if stages is None:
            return ended(launch.run(trials, options, sweep.name, sweep.config()), sweep, trials, start)
        result = tuned.run(stages, options, run_check)
    except ConfigError as error:
        return refuse(error)
    if result.missing:
        print(
            f"[sweep] {result.missing} stage-1 trial(s) neither finished nor diverged; run the same command "
            "again to resume them (stage 2 needs every rate of every arm).",
            file=sys.stderr,
        )
        return 1
    return ended(result.outcome, sweep, result.stage2, start, result.stage == 1)


def ended(outcome: Outcome, sweep: Sweep, trials: list[Trial], start: float, stage1: bool = False) -> int:
    """The exit code of a launch: for a SLURM array left running what to run when it ends; once every
    trial has run here, the summary and the report."""
    if outcome.submitted:
        then = (
            "run the same command again (it chooses the rates and submits stage 2)"
            if stage1
            else f"make report  (or python -m diffbench.report --runs {runs_root(trials[0].directory)})"
        )
        print(f"[sweep] when the array has finished: {then}")
    return finish(sweep, trials, start) if outcome.code is None else outcome.code


def finish(sweep: Sweep, trials: list[Trial], start: float) -> int:
    """The summary table(s) and the report of the trials, and whether any is still incomplete."""
    where = trials[0].directory
    for setting, subset in summary_sets(trials):
        if setting is not None:
            print(f"[sweep] {setting.text}")
        print(
            summarize_trials([t.directory for t in subset], trials_root(where) / summary_stem(sweep, setting))
        )
    print(f"[sweep] wall time {time.perf_counter() - start:.0f} s")
    report_main(["--runs", str(trials_root(where)), "--out", str(runs_root(where) / "report")])
    incomplete = [t for t in trials if not (t.directory / RESULTS).is_file()]
    if incomplete:
        print(
            f"[sweep] {len(incomplete)} trial(s) incomplete; run the same command again to resume them.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
