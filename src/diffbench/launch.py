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
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from diffbench.config import ConfigError

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


def run_local_jobs(
    jobs: list[TrialJob],
    runs_root: Path,
    slots: list[str | None],
    report: Callable[[int, TrialJob, str], None],
) -> list[str]:
    """Every trial as a separate local job through submitit's local executor, one job per slot at
    a time, each with its slot's GPUs and its share of the cores; returns each job's final state."""
    import submitit

    executor = submitit.LocalExecutor(folder=submitit_folder(runs_root))
    executor.update_parameters(timeout_min=60 * 24 * 7)
    threads = cpu_share(len(slots))

    def work(index: int, slot: str | None) -> str:
        job = jobs[index].on(slot, threads)
        handle = executor.submit(job)
        report(index, job, "started")
        failed = handle.exception() is not None
        report(index, job, "FAILED" if failed else "done")
        return "FAILED" if failed else "COMPLETED"

    return on_slots(len(jobs), slots, work)
