"""`make sweep OBJ=…`: every arm × seed from a YAML in `sweeps/`, through W&B sweeps when
logged in and through the local runner otherwise — the same grid and the same command."""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from diffbench.analysis.summary import summarize_trials
from diffbench.cli.report import main as report_main
from diffbench.config import ConfigError, available, compose, find_choice
from diffbench.rundir import RESULTS, SWEEP_LOG, runs_root, trial_dir, trials_root
from diffbench.tracking import has_wandb_credentials

SUMMARY_NAME = "summary"


def sweeps_dir() -> Path:
    """`$DIFFBENCH_SWEEPS`, else `./sweeps` of the working directory, else this checkout's `sweeps/`."""
    env = os.environ.get("DIFFBENCH_SWEEPS")
    if env:
        return Path(env)
    local = Path.cwd() / "sweeps"
    return local if local.is_dir() else Path(__file__).resolve().parents[3] / "sweeps"


def valid_objs() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.yaml")) + available("experiment")


def load_sweep(obj: str) -> dict:
    """sweeps/<obj>.yaml, or all.yaml narrowed to one experiment when obj names one."""
    path = sweeps_dir() / f"{obj}.yaml"
    if path.is_file():
        return yaml.safe_load(path.read_text())
    if find_choice("experiment", obj) is not None:
        sweep = yaml.safe_load((sweeps_dir() / "all.yaml").read_text())
        sweep["name"] = f"diffbench-{obj}"
        sweep["parameters"]["experiment"] = {"values": [obj]}
        return sweep
    raise ConfigError(
        f"unknown OBJ {obj!r}. Valid values: {', '.join(valid_objs())} "
        "(all, a head, a weighting, or one experiment name), e.g. make sweep OBJ=eps."
    )


def parse_seeds(seeds: str) -> list[int]:
    """`3` means seeds 0, 1, 2; `0,5,7` lists them."""
    try:
        values = [int(s) for s in seeds.replace(" ", "").split(",") if s]
    except ValueError as error:
        raise ConfigError(f"SEEDS={seeds!r} is not a count (3) or a comma-separated list (0,1,2).") from error
    return list(range(values[0])) if len(values) == 1 and "," not in seeds else values


def apply_options(
    sweep: dict, profile: str | None, data: str | None, seeds: str | None, extra: list[str]
) -> dict:
    """The YAML with the make variables folded in, so both runners see one grid."""
    params = sweep["parameters"]
    if profile:
        params["profile"] = {"value": profile}
    if data:
        params["data"] = {"value": data}
    if seeds:
        params["seed"] = {"values": parse_seeds(seeds)}
    if extra:
        marker = sweep["command"].index("${args_no_hyphens}")
        sweep["command"] = [*sweep["command"][: marker + 1], *extra, *sweep["command"][marker + 1 :]]
    return sweep


def expand_grid(sweep: dict) -> list[dict[str, object]]:
    """Every grid point as {parameter: value}, in the YAML's order."""
    names, choices = [], []
    for name, spec in sweep["parameters"].items():
        names.append(name)
        choices.append(spec["values"] if "values" in spec else [spec["value"]])
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


def check_gpus(gpus: int) -> None:
    if gpus <= 0:
        return
    import torch

    available = torch.cuda.device_count()
    if gpus > available:
        instead = f"GPUS={available} or " if available else ""
        raise ConfigError(
            f"GPUS={gpus} but this machine has {available} CUDA device(s). Use {instead}GPUS=0 "
            "(train on the CPU); nothing was started."
        )


def hardware_args(gpus: int) -> list[str]:
    return [] if gpus <= 0 else ["trainer.accelerator=gpu", f"trainer.devices={gpus}", "trainer=gpu"]


def run_trial(command: list[str], env: dict[str, str], log: Path | None) -> int:
    """One trial's process; with a log file its output goes there instead of the terminal."""
    if log is None:
        return subprocess.call(command, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        return subprocess.call(command, env=env, stdout=handle, stderr=subprocess.STDOUT)


def run_local(
    sweep: dict, points: list[dict[str, object]], dirs: list[Path], env: dict[str, str], jobs: int
) -> list[dict]:
    """Run every trial's command, `jobs` at a time (each with cores/jobs threads; their output
    then goes to <trial dir>/sweep.log); finished trials return at once (run.reuse)."""
    if jobs > 1:
        env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    lock = threading.Lock()
    done: list[dict] = []

    def one(index: int) -> dict:
        point = points[index]
        label = " ".join(f"{k}={v}" for k, v in point.items())
        log = dirs[index] / SWEEP_LOG if jobs > 1 else None
        with lock:
            where = f" (log: {log})" if log else ""
            print(f"[sweep] trial {index + 1}/{len(points)} started: {label}{where}", flush=True)
        start = time.perf_counter()
        code = run_trial(trial_command(sweep, point), env, log)
        outcome = {"point": point, "returncode": code, "seconds": time.perf_counter() - start}
        with lock:
            done.append(outcome)
            status = "done" if code == 0 else f"FAILED (exit code {code})"
            print(
                f"[sweep] trial {index + 1}/{len(points)} {status} in {outcome['seconds']:.0f} s: {label} "
                f"[{len(done)}/{len(points)} finished]",
                flush=True,
            )
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, range(len(points))))


def run_wandb(sweep: dict, agents: int, gpus: int, env: dict[str, str]) -> None:
    """Create the W&B sweep from the YAML and run one CLI agent per GPU group."""
    import wandb

    sweep_id = wandb.sweep(
        sweep=sweep, project=env.get("WANDB_PROJECT", "diffbench"), entity=env.get("WANDB_ENTITY")
    )
    groups = [list(range(gpus))[i::agents] for i in range(agents)] if gpus else [[] for _ in range(agents)]
    procs = []
    for group in groups:
        agent_env = dict(env)
        if group:
            agent_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, group))
        project = env.get("WANDB_PROJECT", "diffbench")
        target = (
            f"{env['WANDB_ENTITY']}/{project}/{sweep_id}"
            if env.get("WANDB_ENTITY")
            else f"{project}/{sweep_id}"
        )
        procs.append(subprocess.Popen(["wandb", "agent", target], env=agent_env))
    for proc in procs:
        proc.wait()


def trial_dirs(sweep: dict, points: list[dict[str, object]]) -> list[Path]:
    """Where each grid point's run lives: named by its resolved config (see run.reuse)."""
    return [trial_dir(compose(trial_overrides(trial_command(sweep, point)))) for point in points]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbench.sweep", description=__doc__)
    parser.add_argument(
        "--obj", default="all", help="all | eps | x0 | score | simple | elbo | an experiment name"
    )
    parser.add_argument("--profile", default=None, help="smoke | default | full (budget of each trial)")
    parser.add_argument("--data", default=None, help="dataset config name, e.g. digits or gmm")
    parser.add_argument("--seeds", default=None, help="a count (3 → 0,1,2) or a list (0,4,7)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per trial (DDP); 0 = CPU")
    parser.add_argument("--jobs", type=int, default=0, help="local trials at once (0: 2 on CPU, 1 with GPUs)")
    parser.add_argument("--agents", type=int, default=1, help="parallel W&B agents, GPUs split among them")
    parser.add_argument(
        "--args", default="", help="extra overrides for every trial, e.g. 'trainer.max_steps=500'"
    )
    parser.add_argument(
        "--local", action="store_true", help="use the local runner even when logged in to W&B"
    )
    options = parser.parse_args(argv)
    try:
        extra = shlex.split(options.args) + hardware_args(options.gpus) + ["run.reuse=true"]
        sweep = apply_options(load_sweep(options.obj), options.profile, options.data, options.seeds, extra)
        points = expand_grid(sweep)
        dirs = trial_dirs(sweep, points)
        check_gpus(options.gpus)
    except ConfigError as error:
        print(f"diffbench.sweep: {error}", file=sys.stderr)
        return 2
    online = (
        not options.local and has_wandb_credentials() and os.environ.get("WANDB_MODE", "online") == "online"
    )
    env = dict(os.environ)
    print(
        f"[sweep] {sweep['name']}: {len(points)} trials, "
        f"{'W&B sweep' if online else 'local runner, W&B offline'}"
    )
    start = time.perf_counter()
    if online:
        run_wandb(sweep, options.agents, options.gpus, env)
    else:
        env.setdefault("WANDB_MODE", "offline")
        jobs = options.jobs or (1 if options.gpus else min(2, os.cpu_count() or 1))
        run_local(sweep, points, dirs, env, jobs)
    table = summarize_trials(dirs, trials_root(dirs[0]) / f"{SUMMARY_NAME}-{sweep['name']}")
    print(table)
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


if __name__ == "__main__":
    sys.exit(main())
