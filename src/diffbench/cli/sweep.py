"""`make sweep OBJ=…`: every arm × seed from a YAML in `sweeps/`, through W&B sweeps when
logged in and through the local runner otherwise — the same grid and the same command.
`OBJ=lr` is no YAML: it reruns another sweep's arms at several learning rates (`learning_rate_sweep`)."""

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
from diffbench.rundir import DIVERGED, RESULTS, SWEEP_LOG, RunDir, runs_root, trial_dir, trials_root
from diffbench.spec import build_spec
from diffbench.tracking import wandb_online

SUMMARY_NAME = "summary"
LR_OBJ = "lr"
LEARNING_RATES = (3e-4, 1e-3, 3e-3)
"""optim.lr of the learning-rate check: the default 1e-3 and a factor of about 3 either side."""
LR_SEED = 0


def sweeps_dir() -> Path:
    """`$DIFFBENCH_SWEEPS`, else `./sweeps` of the working directory, else this checkout's `sweeps/`."""
    env = os.environ.get("DIFFBENCH_SWEEPS")
    if env:
        return Path(env)
    local = Path.cwd() / "sweeps"
    return local if local.is_dir() else Path(__file__).resolve().parents[3] / "sweeps"


def valid_objs() -> list[str]:
    return sorted([*(p.stem for p in sweeps_dir().glob("*.yaml")), LR_OBJ]) + available("experiment")


def learning_rate_sweep(sweep: dict) -> dict:
    """The same arms at each of LEARNING_RATES on seed LR_SEED alone: does an arm's rank hold up
    when the learning rate moves? optim.lr enters every trial's config, so each rate gets its
    own trial directory (config hash) and the rate is recorded in config.yaml."""
    parameters = {name: spec for name, spec in sweep["parameters"].items() if name != "seed"}
    parameters["optim.lr"] = {"values": list(LEARNING_RATES)}
    parameters["seed"] = {"value": LR_SEED}
    return {**sweep, "name": f"{sweep['name']}-{LR_OBJ}", "parameters": parameters}


def load_sweep(obj: str, lr_of: str = "all") -> dict:
    """sweeps/<obj>.yaml, all.yaml narrowed to one experiment when obj names one, or for
    obj=lr the sweep `lr_of` (any other OBJ) at several learning rates."""
    if obj == LR_OBJ:
        if lr_of == LR_OBJ:
            raise ConfigError(
                "LR_OF=lr would check the learning rates of itself; pick a sweep, e.g. LR_OF=grid."
            )
        return learning_rate_sweep(load_sweep(lr_of))
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
        "(all, grid for every head × weighting, weightings for the eps head under each weighting, "
        "lr for the learning-rate check, a head, a weighting, or one experiment name), "
        "e.g. make sweep OBJ=eps."
    )


def parse_seeds(seeds: str) -> list[int]:
    """`3` means seeds 0, 1, 2; `0,5,7` lists them; anything selecting no seed is refused."""
    try:
        values = [int(s) for s in seeds.replace(" ", "").split(",") if s]
    except ValueError:
        values = []
    chosen = list(range(values[0])) if len(values) == 1 and "," not in seeds else values
    if not chosen or min(chosen) < 0:
        raise ConfigError(
            f"SEEDS={seeds!r} selects no seeds: give a positive count (SEEDS=3 runs seeds 0, 1, 2) "
            "or a comma-separated list of non-negative seeds (SEEDS=0,5,7); nothing was started."
        )
    return chosen


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
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env = {**env, "OMP_NUM_THREADS": threads, "DIFFBENCH_THREADS": threads}
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
            if (RunDir(dirs[index]).read_results() or {}).get("status") == DIVERGED:
                status = f"DIVERGED (no metrics; {dirs[index] / RESULTS} says where)"
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
    return [trial_dir(build_spec(compose(trial_overrides(trial_command(sweep, point))))) for point in points]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbench.sweep", description=__doc__)
    parser.add_argument(
        "--obj",
        default="all",
        help="all | grid | weightings | lr | eps | x0 | score | simple | elbo | an experiment name",
    )
    parser.add_argument(
        "--lr-of", default=None, help=f"with --obj {LR_OBJ}: the sweep whose arms are checked (default all)"
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
        if options.lr_of is not None and options.obj != LR_OBJ:
            raise ConfigError(
                f"LR_OF={options.lr_of} only applies to OBJ={LR_OBJ}; drop it or set OBJ={LR_OBJ}."
            )
        extra = shlex.split(options.args) + hardware_args(options.gpus) + ["run.reuse=true"]
        sweep = load_sweep(options.obj, options.lr_of or "all")
        sweep = apply_options(sweep, options.profile, options.data, options.seeds, extra)
        points = expand_grid(sweep)
        dirs = trial_dirs(sweep, points)
        check_gpus(options.gpus)
    except ConfigError as error:
        print(f"diffbench.sweep: {error}", file=sys.stderr)
        return 2
    online = not options.local and os.environ.get("WANDB_MODE", "online") == "online" and wandb_online()
    env = dict(os.environ)
    print(
        f"[sweep] {sweep['name']}: {len(points)} trials, "
        f"{'W&B sweep' if online else 'local runner, W&B offline'}"
    )
    start = time.perf_counter()
    if online:
        try:
            run_wandb(sweep, options.agents, options.gpus, env)
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
        jobs = options.jobs or (1 if options.gpus else min(2, os.cpu_count() or 1))
        run_local(sweep, points, dirs, env, jobs)
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


if __name__ == "__main__":
    sys.exit(main())
