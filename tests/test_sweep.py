"""Sweep YAMLs, the local runner end to end, resumption, multi-process DDP, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sweeps as wandb_sweeps
import yaml

from conftest import TINY
from diffbench.cli.run import check_settings
from diffbench.cli.sweep import (
    expand_grid,
    load_sweep,
    main,
    parse_seeds,
    sweeps_dir,
    trial_command,
    trial_overrides,
)
from diffbench.config import ConfigError, compose

SWEEP_FILES = sorted(sweeps_dir().glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_yaml_is_valid_for_wandb_and_every_point_composes(path: Path) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert wandb_sweeps.schema_violations_from_proposed_config(sweep) == []
    assert sweep["method"] == "grid" and "${args_no_hyphens}" in sweep["command"]
    points = expand_grid(sweep)
    assert len(points) == len(sweep["parameters"]["experiment"]["values"]) * len(
        sweep["parameters"]["seed"]["values"]
    )
    for point in points:
        command = trial_command(sweep, point)
        assert command[:3] == [sys.executable, "-m", "diffbench.run"]
        cfg = compose(trial_overrides(command))
        check_settings(cfg)
        assert cfg.experiment == point["experiment"] and cfg.seed == point["seed"]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ("all", {"eps_simple", "eps_elbo", "x0_simple", "x0_elbo", "score_simple", "score_elbo"}),
        ("x0", {"x0_simple", "x0_elbo"}),
        ("elbo", {"eps_elbo", "x0_elbo", "score_elbo"}),
        ("score_simple", {"score_simple"}),
    ],
)
def test_obj_selects_arms(obj: str, expected: set[str]) -> None:
    assert set(load_sweep(obj)["parameters"]["experiment"]["values"]) == expected


def test_seeds_count_or_list() -> None:
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,5,7") == [0, 5, 7]
    with pytest.raises(ConfigError):
        parse_seeds("three")


def test_unknown_obj_lists_valid_values(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--obj", "epsilon"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("all", "eps", "simple", "elbo", "x0_elbo"))


def test_too_many_gpus_fails_before_training(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--obj", "eps", "--gpus", "64"]) == 2
    assert "GPUS=64" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def sweep_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "diffbench.sweep", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_offline_runner_end_to_end_and_rerun_skips(tmp_path: Path) -> None:
    args = ["--obj", "eps_simple", "--profile", "smoke", "--seeds", "2", "--args", " ".join(TINY[1:])]
    first = sweep_cli(tmp_path, *args)
    assert first.returncode == 0, first.stderr[-3000:]
    trials = sorted((tmp_path / "runs" / "trials" / "smoke-digits" / "eps_simple").iterdir())
    assert [t.name.split("-")[0] for t in trials] == ["s0", "s1"]
    for trial in trials:
        results = json.loads((trial / "results.json").read_text())
        assert results["status"] == "complete" and results["profile"] == "smoke"
        assert {"nll_vlb_bpd", "nll_ode_bpd", "fd_digits"} <= set(results["metrics"])
        assert list((trial / "wandb").glob("offline-run-*"))
    summary = json.loads(
        (tmp_path / "runs" / "trials" / "smoke-digits" / "summary-diffbench-eps_simple.json").read_text()
    )
    assert summary["complete"] == 2 and summary["table"]["eps_simple"]["nll_vlb_bpd"]["n"] == 2
    assert "eps_simple" in first.stdout and "nll_vlb_bpd" in first.stdout
    report = tmp_path / "runs" / "report" / "smoke-digits-2steps-linear-T20-small"
    table = json.loads((report / "report.json").read_text())["table"]
    assert table["eps_simple"]["nll_vlb_bpd"]["value"]["n"] == 2 and (report / "report.html").is_file()
    assert "[report]" in first.stdout
    written = {t: (t / "results.json").stat().st_mtime_ns for t in trials}
    second = sweep_cli(tmp_path, *args)
    assert second.returncode == 0
    for trial in trials:
        assert (trial / "results.json").stat().st_mtime_ns == written[trial]
        assert "already complete" in (trial / "sweep.log").read_text()


def test_killed_trial_resumes_from_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        "trainer.max_steps=40",
        "run.checkpoint_every=5",
        "trainer.val_check_interval=40",
        f"run.dir={run_dir}",
    ]
    command = [sys.executable, "-m", "diffbench.run", "experiment=x0_simple", *args]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "last.ckpt").is_file() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "results.json").exists(), "the run finished before it could be interrupted"
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == 40
    assert "resuming the interrupted run" in resumed.stdout
    with (run_dir / "metrics.csv").open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")]
    assert steps[0] == 0 and steps[-1] == 39, "rows logged before the kill are kept"
    assert steps == sorted(set(steps)) and len(steps) >= 39, (
        "no step twice, at most the checkpoint step missing"
    )


def test_two_process_ddp_matches_single_process_definitions(tmp_path: Path) -> None:
    common = [*TINY, "eval.num_samples=10", "eval.num_images=15", "eval.ode_images=5"]
    outcomes = {}
    for devices in (1, 2):
        run_dir = tmp_path / f"ddp{devices}"
        overrides = [f"trainer.devices={devices}", "trainer.accelerator=cpu", f"run.dir={run_dir}"]
        if devices == 2:
            overrides.append("trainer.strategy=ddp")
        command = [sys.executable, "-m", "diffbench.run", "experiment=eps_simple", *common, *overrides]
        proc = subprocess.run(
            command, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outcomes[devices] = json.loads((run_dir / "results.json").read_text())
    single, double = outcomes[1], outcomes[2]
    assert double["steps"] == single["steps"] == 2
    assert (
        double["evaluation"]["sample_settings"]["num_samples"]
        == single["evaluation"]["sample_settings"]["num_samples"]
        == 10
    )
    assert (
        double["evaluation"]["nll_vlb_settings"]["num_images"]
        == single["evaluation"]["nll_vlb_settings"]["num_images"]
        == 15
    )
    assert double["evaluation"]["nll_ode_settings"]["num_images"] == 5
    for key in ("nll_vlb_bpd", "nll_ode_bpd", "fd_digits"):
        assert key in double["metrics"]
