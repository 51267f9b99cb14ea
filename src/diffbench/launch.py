"""Where and how a sweep's trials run: which GPUs each trial is pinned to, and the launchers that
run the very same trial command — the local runner's threads, W&B agents, and SLURM job arrays or
separate local jobs through submitit. Every launcher writes the same trial directories, so a rerun
of any launcher skips finished trials and resumes the rest from their checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffbench.config import ConfigError

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


@dataclass(frozen=True)
class TrialJob:
    """One trial as a submitit job: the trial command in a subprocess. On preemption or timeout
    submitit calls `checkpoint`, which requeues the same job; the trial resumes from its own
    checkpoint (run.reuse), so nothing needs to be saved here."""

    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    log: str

    def __call__(self) -> int:
        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as handle:
            code = subprocess.call(
                list(self.command), env=dict(self.env), stdout=handle, stderr=subprocess.STDOUT
            )
        if code != 0:
            raise RuntimeError(f"trial exited with code {code}; its output is in {self.log}")
        return code

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
    poll_s: float = 0.5,
) -> list[str]:
    """Every trial as a separate local job through submitit's local executor, one job per slot at
    a time (a slot is a GPU group, or None on the CPU); returns each job's final state."""
    import submitit

    executor = submitit.LocalExecutor(folder=submitit_folder(runs_root))
    executor.update_parameters(timeout_min=60 * 24 * 7)
    states = ["PENDING"] * len(jobs)
    free, running, queue = list(slots), {}, list(range(len(jobs)))
    while queue or running:
        while queue and free:
            index, slot = queue.pop(0), free.pop(0)
            job = jobs[index]
            if slot is not None:
                job = TrialJob(job.command, tuple({**dict(job.env), VISIBLE: slot}.items()), job.log)
            running[index] = (executor.submit(job), slot)
            report(index, job, "started")
        time.sleep(poll_s)
        for index, (handle, slot) in list(running.items()):
            if handle.done():
                failed = handle.exception() is not None
                states[index] = "FAILED" if failed else "COMPLETED"
                report(index, jobs[index], "FAILED" if failed else "done")
                free.append(slot)
                del running[index]
    return states


def python_command(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *args]
