"""Exact resume: a run killed at any point and run again gives the uninterrupted run's results,
bit for bit (same CPU thread count); damaged checkpoints are passed over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY
from diffbench.rundir import RunDir

STEPS = 8
ARGS = [
    "experiment=eps_elbo",
    *TINY,
    f"trainer.max_steps={STEPS}",
    "run.checkpoint_every=2",
    "trainer.val_check_interval=4",
    "eval.budget_base=2",
    "eval.budget_samples=8",
    "eval.ode_images=0",
    "speed.threads=1",
]
ENV = {**os.environ, "WANDB_MODE": "offline", "DIFFBENCH_THREADS": "1"}


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "diffbench.run", *ARGS, f"run.dir={run_dir}"]


def finish(run_dir: Path) -> dict:
    proc = subprocess.run(command(run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def numbers(results: dict) -> dict:
    """Everything a run computes, without wall times and paths."""
    budgets = [{k: v for k, v in row.items() if k != "wall_time_s"} for row in results["budgets"]]
    settings = {
        name: {k: v for k, v in value.items() if k != "wall_time_s"} if isinstance(value, dict) else value
        for name, value in results["evaluation"].items()
    }
    return {
        "metrics": results["metrics"],
        "budgets": budgets,
        "optimisation": results["optimisation"],
        "evaluation": settings,
        "steps": results["steps"],
    }


def kill_when(run_dir: Path, ready: str) -> None:
    """Start the run and SIGKILL it as soon as `ready` (a path inside the run directory) exists."""
    proc = subprocess.Popen(command(run_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / ready).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists(), f"the run finished before {ready} appeared"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return numbers(finish(tmp_path_factory.mktemp("uninterrupted") / "run"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "ready",
    [
        "checkpoints/step0000002.ckpt",  # right after the first checkpoint
        "checkpoints/step0000006.ckpt",  # right after a later one, budgets and validations behind it
        "vlb_terms.csv",  # during evaluation: training is over, its last checkpoint is on disk
    ],
)
def test_killed_run_resumes_to_the_same_numbers(tmp_path: Path, reference: dict, ready: str) -> None:
    run_dir = tmp_path / "run"
    kill_when(run_dir, ready)
    assert numbers(finish(run_dir)) == reference


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_passed_over(tmp_path: Path, reference: dict) -> None:
    run_dir = tmp_path / "run"
    kill_when(run_dir, "checkpoints/step0000006.ckpt")
    checkpoints = run_dir / "checkpoints"
    for name in ("last.ckpt", "step0000006.ckpt"):
        path = checkpoints / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    path, step, damaged = RunDir(run_dir).latest_checkpoint()
    assert (path, step) == (checkpoints / "step0000004.ckpt", 4)
    assert damaged == [checkpoints / "last.ckpt", checkpoints / "step0000006.ckpt"]
    proc = subprocess.run(command(run_dir), env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step0000006.ckpt cannot be loaded" in proc.stdout
    assert numbers(json.loads((run_dir / "results.json").read_text())) == reference


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_it_stopped_at_and_resumes_to_the_same_numbers(
    tmp_path: Path, reference: dict
) -> None:
    """SIGTERM (a scheduler's preemption) is a stop, not a success: the run saves the step it
    stopped at, exits with 143 and no results.json, and the same command resumes it bit for bit."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints/step0000002.ckpt").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    message = stderr.decode()
    assert proc.returncode == 143, message[-2000:]
    assert "stopped by SIGTERM at step" in message and "Run the same command again" in message
    stopped_at = int(message.split("stopped by SIGTERM at step ")[1].split()[0])
    assert not (run_dir / "results.json").exists()
    _, step, _ = RunDir(run_dir).latest_checkpoint()
    assert step == stopped_at >= 2
    assert numbers(finish(run_dir)) == reference


@pytest.mark.slow
def test_sigterm_during_the_evaluation_stops_it_and_the_rerun_evaluates(tmp_path: Path) -> None:
    """Past `trainer.fit`, Lightning only notes a SIGTERM; the run must still stop (143, no
    results.json) rather than evaluate to the end and exit 0, and the rerun evaluates the same
    network to the same numbers."""
    run_dir = tmp_path / "run"
    args = [*command(run_dir), "eval.vlb_timesteps=0"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = b""
    while b"VLB terms" not in seen and proc.poll() is None:
        seen = seen[-64:] + os.read(proc.stderr.fileno(), 4096)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    message = stderr.decode()
    assert proc.returncode == 143, message[-2000:]
    assert "stopped by SIGTERM after training, while evaluating" in message
    assert not (run_dir / "results.json").exists()
    assert RunDir(run_dir).latest_checkpoint()[1] == STEPS
    rerun = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    uninterrupted = subprocess.run(
        [*command(tmp_path / "whole"), "eval.vlb_timesteps=0"], env=ENV, capture_output=True, timeout=600
    )
    assert uninterrupted.returncode == 0
    assert numbers(json.loads((run_dir / "results.json").read_text())) == numbers(
        json.loads((tmp_path / "whole" / "results.json").read_text())
    )
