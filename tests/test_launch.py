"""Scale-out: trials pinned to the GPUs of a node (a faked device count), W&B agents pinned to the
same groups (without contacting W&B), and submitit's local executor running a sweep's trials as
separate jobs — one of them killed and rerun to the same results as an uninterrupted run."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import TINY, spec_of
from diffbench import launch
from diffbench.config import ConfigError
from diffbench.launch import THREADS, VISIBLE, LaunchOptions, gpu_slots, trial_env
from diffbench.plan import Trial, load_sweep
from diffbench.sweep import main

EIGHT = [str(i) for i in range(8)]


@pytest.fixture
def eight_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node with eight GPUs, as torch would report it."""
    monkeypatch.delenv(VISIBLE, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)


def test_one_gpu_per_trial_two_trials_per_gpu_fills_every_gpu(eight_gpus: None) -> None:
    slots = LaunchOptions(gpus=1, trials_per_gpu=2, jobs=0).slots()
    assert len(slots) == 16 and all(slot in EIGHT for slot in slots)
    assert Counter(slots) == dict.fromkeys(EIGHT, 2)


def test_two_gpus_per_trial_make_four_pairs(eight_gpus: None) -> None:
    assert LaunchOptions(gpus=2, trials_per_gpu=1, jobs=0).slots() == ["0,1", "2,3", "4,5", "6,7"]
    assert LaunchOptions(gpus=3, trials_per_gpu=1, jobs=0).slots() == ["0,1,2", "3,4,5"]  # GPUs 6, 7 idle


def test_visible_devices_are_the_ones_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VISIBLE, "3,5")
    assert LaunchOptions(gpus=1, trials_per_gpu=1, jobs=0).slots() == ["3", "5"]


@pytest.mark.parametrize(("gpus", "per_gpu", "phrase"), [(9, 1, "GPUS=9"), (1, 0, "TRIALS_PER_GPU=0")])
def test_combinations_that_cannot_fit_are_refused(gpus: int, per_gpu: int, phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        gpu_slots(EIGHT, gpus, per_gpu)


def test_a_sweep_that_cannot_fit_exits_2_before_anything(
    eight_gpus: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--obj", "eps", "--gpus", "16"]) == 2
    assert "GPUS=16" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_cpu_trials_keep_the_jobs_meaning() -> None:
    assert LaunchOptions(gpus=0, trials_per_gpu=4, jobs=3).slots() == [None, None, None]


def test_trial_environment_pins_devices_and_splits_threads() -> None:
    env = trial_env({"PATH": "/bin"}, "2,3", 4)
    assert env[VISIBLE] == "2,3" and all(env[name] == "4" for name in THREADS) and env["PATH"] == "/bin"
    assert VISIBLE not in trial_env({}, None, 1)


def test_local_runner_pins_each_running_trial_to_its_own_slot(
    eight_gpus: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Sixteen trials on eight GPUs, two per GPU: at no moment do three trials share a GPU."""
    running: Counter[str] = Counter()
    most: Counter[str] = Counter()
    seen: list[str] = []

    def fake_trial(command: list[str], env: dict[str, str], log: Path | None) -> int:
        device = env[VISIBLE]
        running[device] += 1
        most[device] = max(most[device], running[device])
        seen.append(device)
        time.sleep(0.02)
        running[device] -= 1
        return 0

    monkeypatch.setattr(launch, "run_trial", fake_trial)
    sweep = load_sweep("all")
    spec = spec_of([])  # the runner reads each trial's command, directory and label
    points = [{"experiment": "eps_simple", "seed": s} for s in range(32)]
    trials = [Trial(p, spec, tuple(sweep.command_of(p)), tmp_path / f"t{i}") for i, p in enumerate(points)]
    slots = LaunchOptions(gpus=1, trials_per_gpu=2, jobs=0).slots()
    launch.run_local(trials, {}, slots)
    assert len(seen) == 32 and set(seen) == set(EIGHT) and max(most.values()) <= 2


def test_wandb_agents_are_pinned_to_the_same_groups(
    eight_gpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One agent per GPU slot by default, --agents lowers it; the sweep is created once and every
    agent gets its own CUDA_VISIBLE_DEVICES (W&B is faked: nothing is contacted)."""
    import wandb

    started: list[dict[str, str]] = []

    class Agent:
        def __init__(self, command: list[str], env: dict[str, str]) -> None:
            assert command[:2] == ["wandb", "agent"] and command[2].endswith("/abc123")
            started.append(env)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(wandb, "sweep", lambda **kwargs: "abc123")
    monkeypatch.setattr(launch.subprocess, "Popen", Agent)
    for gpus, per_gpu, agents, expected in (
        (1, 1, 0, EIGHT),
        (2, 1, 0, ["0,1", "2,3", "4,5", "6,7"]),
        (1, 2, 3, ["0", "0", "1"]),
    ):
        started.clear()
        options = LaunchOptions(gpus=gpus, trials_per_gpu=per_gpu, agents=agents)
        launch.run_wandb(load_sweep("all").config(), options.agent_slots(options.slots()), {})
        assert [env[VISIBLE] for env in started] == expected
    assert LaunchOptions().agent_slots([None, None]) == [None]


def run_sweep(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "diffbench.sweep", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


SMOKE = ["--obj", "eps_simple", "--profile", "smoke", "--seeds", "2"]
LONGER = " ".join(
    [*TINY[1:], "trainer.max_steps=30", "run.checkpoint_every=5", "trainer.val_check_interval=30"]
)


def final_metrics(root: Path) -> dict[str, dict]:
    trials = sorted((root / "runs" / "trials" / "smoke-digits" / "eps_simple").iterdir())
    return {t.name: json.loads((t / "results.json").read_text())["metrics"] for t in trials}


def trial_processes(cwd: Path) -> list[int]:
    """The `python -m diffbench.run` processes started from `cwd` (the trials of a sweep there)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"diffbench.run" in (entry / "cmdline").read_bytes().split(b"\0"):
                if (entry / "cwd").resolve() == cwd.resolve():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The two smoke trials run through once with the local runner, one at a time (so with the
    threads the tests below give each trial): the numbers every interrupted and resumed sweep
    below must reproduce, whatever launcher ran it."""
    calm = tmp_path_factory.mktemp("calm")
    with pytest.MonkeyPatch.context() as patch:  # the session's cache, as the tests' own sweeps use
        patch.setenv("DIFFBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        first = run_sweep(calm, *SMOKE, "--jobs", "1", "--args", LONGER)
    assert first.returncode == 0, first.stderr[-3000:]
    expected = final_metrics(calm)
    assert len(expected) == 2
    return expected


@pytest.mark.slow
def test_local_jobs_launcher_runs_the_sweep_and_a_killed_job_resumes_to_the_same_numbers(
    tmp_path: Path, uninterrupted: dict[str, dict]
) -> None:
    """Two trials as submitit local jobs, the first trial's process killed after its first
    checkpoint (a lost node): that sweep finishes the other trial and exits 1, and its rerun
    completes the killed one with the uninterrupted run's numbers, bit for bit."""
    command = [sys.executable, "-m", "diffbench.sweep", *SMOKE, "--launcher", "local-jobs", "--jobs", "1"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [*command, "--args", LONGER], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    trial_root = tmp_path / "runs" / "trials" / "smoke-digits" / "eps_simple"
    deadline = time.time() + 300
    while not list(trial_root.glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    victims = trial_processes(tmp_path)
    assert len(victims) == 1, "one trial at a time (--jobs 1)"
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "1 trial(s) incomplete" in stderr.decode()
    again = run_sweep(tmp_path, *SMOKE, "--launcher", "local-jobs", "--jobs", "1", "--args", LONGER)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "as local jobs" in again.stdout and "[report]" in again.stdout
    assert list((tmp_path / "runs" / "submitit").iterdir()), "submitit kept its job folders"
    assert final_metrics(tmp_path) == uninterrupted


def test_the_makefile_sweep_line_is_one_the_sweep_command_reads() -> None:
    """`make -n sweep` prints the command `make sweep` would run: every option it passes exists."""
    printed = subprocess.run(
        ["make", "-n", "sweep", "OBJ=all", "LAUNCHER=slurm", "PARTITION=gpu", "WAIT=1", "SEEDS=2"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    ).stdout
    line = next(row for row in printed.replace("\\\n", " ").splitlines() if "-m diffbench.sweep" in row)
    words = shlex.split(line[line.index("-m diffbench.sweep") + len("-m diffbench.sweep") :])
    captured: dict[str, object] = {}

    def record(trials: list[Trial], options: LaunchOptions, *rest: object) -> launch.Outcome:
        captured.update(vars(options), seeds={t.point["seed"] for t in trials})
        return launch.Outcome(0)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "run", record)
        assert main(words) == 0
    assert captured["launcher"] == "slurm" and captured["partition"] == "gpu" and captured["wait"] is True
    assert captured["cpus"] == 4 and captured["time"] == 240 and captured["seeds"] == {0, 1}


def test_slurm_launcher_submits_one_array_and_says_what_to_run_next(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a cluster: submitit's executor is replaced by a recorder. Every trial is one job of
    the array, each the very trial command; the command prints the job id and the report line."""
    submitted: dict[str, object] = {}

    class Job:
        def __init__(self, index: int) -> None:
            self.job_id = f"4242_{index}"

    def submit(jobs: list, root: Path, options: object) -> list:
        submitted.update(jobs=jobs, root=root, options=options)
        return [Job(i) for i in range(len(jobs))]

    monkeypatch.setattr(launch, "submit_slurm", submit)
    monkeypatch.chdir(tmp_path)
    args = ["--obj", "eps", "--seeds", "2", "--launcher", "slurm", "--gpus", "1", "--partition", "a100"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "SLURM job array 4242" in printed and "make report" in printed
    jobs, options = submitted["jobs"], submitted["options"]
    assert len(jobs) == 4 and all(
        "diffbench.run" in job.command and "run.reuse=true" in job.command for job in jobs
    )
    assert (options.partition, options.gpus_per_trial, options.cpus_per_trial, options.parallelism) == (
        "a100",
        1,
        4,
        4,
    )
    assert all(dict(job.overrides).get("WANDB_MODE") for job in jobs)


@pytest.mark.slow
def test_sigterm_to_the_sweep_stops_its_trials_in_order_and_leaves_no_orphan(
    tmp_path: Path, uninterrupted: dict[str, dict]
) -> None:
    """SIGTERM to the sweep: the running trial gets it too, saves its step and exits; no further
    trial starts; the sweep exits 143 once its trial has; the same command then finishes both,
    with the uninterrupted run's numbers."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "diffbench.sweep", *SMOKE, "--jobs", "1", "--args", LONGER]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    trial_root = tmp_path / "runs" / "trials" / "smoke-digits" / "eps_simple"
    deadline = time.time() + 300
    while not list(trial_root.glob("*/checkpoints/last.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr.decode()[-2000:]
    assert "stopped by SIGTERM" in stderr.decode() and not trial_processes(tmp_path)
    assert not list(trial_root.glob("*/results.json")) and len(list(trial_root.iterdir())) == 1
    again = run_sweep(tmp_path, *SMOKE, "--jobs", "1", "--args", LONGER)
    assert again.returncode == 0, again.stderr[-3000:]
    assert final_metrics(tmp_path) == uninterrupted


SOURCE = Path(launch.__file__).parent


def test_one_trial_label_and_one_wandb_fallback_for_the_sweep() -> None:
    """A trial is named by `plan.point_label` alone, and W&B falls back to offline in
    `tracking.go_offline` alone: for a sweep's trials (`trials_online`) and for a run whose wandb.init
    fails (`run_started`)."""
    texts = {p.relative_to(SOURCE).as_posix(): p.read_text() for p in SOURCE.rglob("*.py")}
    labels = {name: text.count('f"{k}={v}" for k, v in') for name, text in texts.items()}
    assert {name: n for name, n in labels.items() if n} == {"plan.py": 1}
    offline = {name: text.count('["WANDB_MODE"] = "offline"') for name, text in texts.items()}
    assert {name: n for name, n in offline.items() if n} == {"tracking.py": 1}
