"""Where and how a sweep's trials run: which GPUs each trial is pinned to, and the launchers that
run the very same trial command — the local runner's threads, W&B agents, and SLURM job arrays or
separate local jobs through submitit. Every launcher writes the same trial directories, so a rerun
of any launcher skips finished trials and resumes the rest from their checkpoints."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from diffbench.config import ConfigError
from diffbench.plan import Trial
from diffbench.rundir import DIVERGED, RESULTS, SWEEP_LOG, RunDir, runs_root
from diffbench.schema import is_int
from diffbench.tracking import trials_online

T = TypeVar("T")
VISIBLE = "CUDA_VISIBLE_DEVICES"
THREADS = ("OMP_NUM_THREADS", "DIFFBENCH_THREADS")


def visible_gpus(device_count: Callable[[], int] | None = None) -> list[str]:
    """The GPUs this process may use, by the ids CUDA_VISIBLE_DEVICES names (or 0..n−1)."""
    if os.environ.get(VISIBLE):
        return [g for g in os.environ[VISIBLE].split(",") if g.strip()]
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count
    return [str(i) for i in range(device_count())]


def gpu_slots(gpus: list[str], per_trial: int, trials_per_gpu: int) -> list[str]:
    """One CUDA_VISIBLE_DEVICES value per trial that can run at once: the GPUs cut into groups of
    `per_trial` (DDP inside a trial), each group shared by `trials_per_gpu` trials. GPUs left over
    when `per_trial` does not divide their number stay idle. Refused when not even one trial fits."""
    if per_trial < 1 or trials_per_gpu < 1:
        raise ConfigError(
            f"GPUS={per_trial} and TRIALS_PER_GPU={trials_per_gpu}: both count things and must be at least 1 "
            "(GPUS=0 trains on the CPU, where TRIALS_PER_GPU does not apply); nothing was started."
        )
    if per_trial > len(gpus):
        instead = f"GPUS={len(gpus)} or " if gpus else ""
        raise ConfigError(
            f"GPUS={per_trial} asks for {per_trial} GPU(s) per trial but this machine shows {len(gpus)} "
            f"({VISIBLE}={os.environ.get(VISIBLE, 'unset')}). Use {instead}GPUS=0 (the CPU); "
            "nothing was started."
        )
    groups = [",".join(gpus[i : i + per_trial]) for i in range(0, len(gpus) - per_trial + 1, per_trial)]
    return [group for group in groups for _ in range(trials_per_gpu)]


def trial_env(env: dict[str, str], devices: str | None, threads: int) -> dict[str, str]:
    """A trial's environment: its own GPUs (or none) and its share of the CPU threads."""
    out = {**env, **dict.fromkeys(THREADS, str(threads))}
    if devices is not None:
        out[VISIBLE] = devices
    return out


def cpu_share(concurrent: int) -> int:
    """Threads per trial when `concurrent` trials share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // max(1, concurrent))


STOP = threading.Event()
"""Set when the sweep was asked to stop: no further trial starts."""
STOP_SIGNALS: list[int] = []
_RUNNING: set[subprocess.Popen] = set()
_GUARD = threading.Lock()
NOT_STARTED = -1


def run_trial(command: list[str], env: dict[str, str], log: Path | None) -> int:
    """One trial's process, in a session of its own (a Ctrl-C reaches the sweep, which stops the
    trials in order); with a log file its output goes there instead of the terminal. Returns its
    exit code, or NOT_STARTED once the sweep is stopping."""
    if STOP.is_set():
        return NOT_STARTED
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") if log is not None else contextlib.nullcontext() as handle:
        output = {"stdout": handle, "stderr": subprocess.STDOUT} if handle is not None else {}
        proc = subprocess.Popen(command, env=env, start_new_session=True, **output)
        with _GUARD:
            _RUNNING.add(proc)
        try:
            return proc.wait()
        finally:
            with _GUARD:
                _RUNNING.discard(proc)


def forward_stop_signals() -> None:
    """SIGTERM or SIGINT to the sweep stops it in order: no further trial starts, and every running
    trial gets SIGTERM, which makes it save the step it is at and exit (the same command resumes
    it); the sweep waits for them."""

    def stop(signum: int, frame: object) -> None:
        STOP.set()
        STOP_SIGNALS.append(signum)
        with _GUARD:
            running = list(_RUNNING)
        for proc in running:
            proc.send_signal(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def on_slots(count: int, slots: list[str | None], work: Callable[[int, str | None], T]) -> list[T]:
    """work(i, slot) for every i < count, each holding one slot (a GPU group, or None for a CPU
    trial) while it runs, so at most one piece of work per slot at a time; results in order."""
    free: queue.Queue[str | None] = queue.Queue()
    for slot in slots:
        free.put(slot)

    def one(index: int) -> T:
        slot = free.get()
        try:
            return work(index, slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        return list(pool.map(one, range(count)))


@dataclass(frozen=True)
class TrialJob:
    """One trial as a submitit job: the trial command in a subprocess, in the environment of the
    machine it runs on plus `overrides` (W&B mode, GPUs, threads). Without a thread count it takes
    the cores SLURM gave the task. On preemption or timeout submitit calls `checkpoint`, which
    requeues the same job; the trial resumes from its own checkpoint (run.reuse)."""

    command: tuple[str, ...]
    overrides: tuple[tuple[str, str], ...]
    log: str

    def __call__(self) -> int:
        env = {**os.environ, **dict(self.overrides)}
        if not any(name in env for name in THREADS):
            env = trial_env(env, None, int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or cpu_share(1))
        code = run_trial(list(self.command), env, Path(self.log))
        if code != 0:
            raise RuntimeError(f"trial exited with code {code}; its output is in {self.log}")
        return code

    def on(self, slot: str | None, threads: int) -> TrialJob:
        """The same job pinned to a GPU slot (or the CPU) with a thread count."""
        overrides = trial_env(dict(self.overrides), slot, threads)
        return TrialJob(self.command, tuple(overrides.items()), self.log)

    def checkpoint(self) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self)


@dataclass(frozen=True)
class SlurmOptions:
    """What a SLURM job array of trials asks for."""

    partition: str | None
    time_min: int
    gpus_per_trial: int
    cpus_per_trial: int
    parallelism: int


def submitit_folder(runs_root: Path) -> Path:
    return runs_root / "submitit" / "%j"


def submit_slurm(jobs: list[TrialJob], runs_root: Path, options: SlurmOptions) -> list[Any]:
    """Submit the trials as one SLURM job array (requeued on preemption or timeout)."""
    import submitit

    executor = submitit.AutoExecutor(folder=submitit_folder(runs_root), cluster="slurm")
    executor.update_parameters(
        timeout_min=options.time_min,
        slurm_partition=options.partition,
        gpus_per_node=options.gpus_per_trial,
        tasks_per_node=1,
        cpus_per_task=options.cpus_per_trial,
        slurm_array_parallelism=options.parallelism,
        name="diffbench-trial",
    )
    return executor.submit_array(jobs)


LAUNCHERS = ("local", "local-jobs", "slurm")
COUNTS = {
    "gpus": 0,
    "trials_per_gpu": 1,
    "jobs": 0,
    "agents": 0,
    "time": 1,
    "cpus": 1,
    "array_parallelism": 0,
}
"""The smallest value of each numeric launch option."""


@dataclass(frozen=True)
class LaunchOptions:
    """Where and how many at once: the launcher (local runner, submitit local jobs or a SLURM
    array), GPUs per trial and trials per GPU, CPU trials at once, W&B agents, and what a SLURM
    array asks for. `local` keeps W&B agents out even when W&B answers."""

    launcher: str = "local"
    gpus: int = 0
    trials_per_gpu: int = 1
    jobs: int = 0
    agents: int = 0
    local: bool = False
    wait: bool = False
    partition: str | None = None
    time: int = 240
    cpus: int = 4
    array_parallelism: int = 0

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(
                f"LAUNCHER={self.launcher} is not a launcher: use one of {', '.join(LAUNCHERS)}; "
                "nothing was started."
            )
        for name, least in COUNTS.items():
            value = getattr(self, name)
            if not is_int(value) or value < least:
                raise ConfigError(
                    f"{name.upper()}={value} is not a count this sweep can use: it must be at least {least} "
                    f"(README's Sweeps table says what it means); nothing was started."
                )

    @property
    def here(self) -> bool:
        """Whether the trials run on this machine (a SLURM array runs them elsewhere)."""
        return self.launcher != "slurm"

    def slots(self) -> list[str | None]:
        """Trials that run here at once: one per GPU group slot, or `jobs` CPU trials (2 by default)."""
        if not self.here:
            return [None]
        if self.gpus <= 0:
            return [None] * (self.jobs or min(2, os.cpu_count() or 1))
        return list(gpu_slots(visible_gpus(), self.gpus, self.trials_per_gpu))

    def agent_slots(self, slots: list[str | None]) -> list[str | None]:
        """The W&B agents started here: by default one per GPU slot (every GPU of the node busy), one
        on the CPU; `agents` lowers it (or, on the CPU, sets it)."""
        if self.gpus <= 0:
            return [None] * (self.agents or 1)
        return slots[: self.agents or len(slots)]


@dataclass(frozen=True)
class Outcome:
    """How a launch ended: `code` None once every trial has run here (the summary comes next),
    else the exit code; `submitted` when a SLURM array was left running."""

    code: int | None = None
    submitted: bool = False


def run(trials: list[Trial], options: LaunchOptions, name: str, wandb_sweep: dict | None = None) -> Outcome:
    """Run the trials with the chosen launcher. `wandb_sweep` is the W&B sweep config the local
    launcher may hand to W&B agents (None: never); whether W&B is online is `tracking`'s call."""
    env = dict(os.environ)
    if options.launcher == "slurm":
        return run_slurm(trials, options, name, env)
    slots = options.slots()
    jobs = options.launcher == "local-jobs"
    agents = wandb_sweep is not None and not jobs and not options.local
    online = trials_online(env, wanted=agents or jobs)
    how = "as local jobs" if jobs else ("W&B sweep" if online else "local runner, W&B offline")
    print(f"[sweep] {name}: {len(trials)} trials{' ' if jobs else ', '}{how}, {len(slots)} at once")
    if online and agents and wandb_sweep is not None:
        try:
            run_wandb(wandb_sweep, options.agent_slots(slots), env)
            return stopped()
        except Exception as error:  # any W&B failure (auth, network, server) must not end the sweep
            print(
                f"[sweep] W&B sweep could not start ({type(error).__name__}: {error}); "
                "running the same trials with the local runner, W&B offline.",
                file=sys.stderr,
            )
            trials_online(env, wanted=False)
    run_local(trials, env, slots, runs_root(trials[0].directory) if jobs else None)
    return stopped()


def stopped() -> Outcome:
    """The exit code of a sweep a signal stopped (it says how to resume), else every trial ran."""
    if STOP.is_set():
        signum = STOP_SIGNALS[0]
        print(
            f"[sweep] stopped by {signal.Signals(signum).name}: the running trials saved their step and "
            "stopped, no further trial started; run the same command again to resume them.",
            file=sys.stderr,
        )
        return Outcome(128 + signum)
    return Outcome()


def run_local(
    trials: list[Trial], env: dict[str, str], slots: list[str | None], jobs: Path | None = None
) -> None:
    """Run every trial's command, one per slot at a time (a slot is a GPU group, or None for a
    CPU trial); each trial gets its slot's GPUs and its share of the cores, and with more than one
    slot its output goes to <trial dir>/sweep.log. With `jobs` (the runs root, where submitit keeps
    its folders) each trial runs as a separate submitit local job instead, always logged to its
    sweep.log. Finished trials return at once (run.reuse)."""
    threads = cpu_share(len(slots))
    lock = threading.Lock()
    done: list[int] = []
    word = "job" if jobs else "trial"
    executor = None
    if jobs is None:
        forward_stop_signals()
    else:
        import submitit

        executor = submitit.LocalExecutor(folder=submitit_folder(jobs))
        executor.update_parameters(timeout_min=60 * 24 * 7)
    job_env = tuple((k, v) for k, v in env.items() if k == "WANDB_MODE")

    def one(index: int, slot: str | None) -> None:
        trial = trials[index]
        log = trial.directory / SWEEP_LOG if len(slots) > 1 or executor is not None else None
        with lock:
            where = (f" on GPU {slot}" if slot is not None else "") + (f" (log: {log})" if log else "")
            print(f"[sweep] {word} {index + 1}/{len(trials)} started: {trial.label}{where}", flush=True)
        start = time.perf_counter()
        if executor is not None:
            job = TrialJob(trial.command, job_env, str(log)).on(slot, threads)
            failed = executor.submit(job).exception() is not None
            status = "FAILED" if failed else "done"
        else:
            code = run_trial(list(trial.command), trial_env(env, slot, threads), log)
            status = "done" if code == 0 else f"FAILED (exit code {code})"
        with lock:
            done.append(index)
            if (RunDir(trial.directory).read_results() or {}).get("status") == DIVERGED:
                status = f"DIVERGED (no metrics; {trial.directory / RESULTS} says where)"
            print(
                f"[sweep] {word} {index + 1}/{len(trials)} {status} in {time.perf_counter() - start:.0f} s: "
                f"{trial.label} [{len(done)}/{len(trials)} finished]",
                flush=True,
            )

    on_slots(len(trials), slots, one)


def run_wandb(sweep: dict, slots: list[str | None], env: dict[str, str]) -> None:
    """Create the W&B sweep from its config and run one CLI agent per slot, each pinned to its GPUs.
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


def run_slurm(trials: list[Trial], options: LaunchOptions, name: str, env: dict[str, str]) -> Outcome:
    """The trials as one SLURM job array (waited for with `wait`; otherwise left running, and the
    command says what to run when it ends), each trial the very command the local runner runs, with
    the W&B mode decided here on top of the environment the job finds where it runs."""
    trials_online(env, wanted=True)
    overrides = tuple((k, v) for k, v in env.items() if k == "WANDB_MODE")
    jobs = [TrialJob(t.command, overrides, str(t.directory / SWEEP_LOG)) for t in trials]
    root = runs_root(trials[0].directory)
    parallelism = options.array_parallelism or len(jobs)
    slurm = SlurmOptions(options.partition, options.time, options.gpus, options.cpus, parallelism)
    try:
        submitted = submit_slurm(jobs, root, slurm)
    except RuntimeError as error:  # submitit's word for "no SLURM here" (no sbatch/srun on PATH)
        raise ConfigError(
            f"LAUNCHER=slurm could not submit the array ({error}). Run the command "
            "on a SLURM login node, or use LAUNCHER=local-jobs on this machine."
        ) from None
    array = submitted[0].job_id.split("_")[0] if submitted else "?"
    print(
        f"[sweep] {name}: {len(jobs)} trials submitted as SLURM job array {array} "
        f"(logs under {root / 'submitit'}); preempted or timed-out trials are requeued and resume."
    )
    if not options.wait:
        return Outcome(0, submitted=True)
    for job in submitted:
        try:
            job.result()
        except Exception as error:  # a failed trial is listed by the report, not fatal to the others
            print(f"[sweep] job {job.job_id} failed: {error}", file=sys.stderr)
    return Outcome()
