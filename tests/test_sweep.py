"""Sweep YAMLs, the local runner end to end, resumption, multi-process DDP, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import sweeps as wandb_sweeps
import torch
import yaml

from conftest import TINY, spec_of
from diffbench.analysis.collect import config_group
from diffbench.analysis.summary import summarize_trials
from diffbench.analysis.tuning import CLIP_KEY
from diffbench.cli.checks import check_settings
from diffbench.config import ConfigError, compose
from diffbench.core.arms import Arm
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.plan import (
    CLIP_OFF,
    LEARNING_RATES,
    Sweep,
    SweepOptions,
    Trial,
    load_sweep,
    overrides_of,
    parse_seeds,
    plan,
    read_sweep,
    summary_sets,
    summary_stem,
    sweeps_dir,
    with_options,
)
from diffbench.rundir import RunDir, trial_dir
from diffbench.spec import RunSpec, build_spec
from diffbench.sweep import main
from diffbench.train.build import build_datamodule, build_module

SWEEP_FILES = sorted(sweeps_dir().glob("*.yaml"))
#: Composing a config takes a good part of a second on a busy machine: a sweep of more trials than
#: this is checked point by point in `make test` only.
FAST_POINTS = 6


def sweep_files() -> list:
    """Every sweep file, the large ones marked slow."""
    return [
        pytest.param(path, marks=pytest.mark.slow)
        if len(read_sweep(path).grid()) > FAST_POINTS
        else pytest.param(path)
        for path in SWEEP_FILES
    ]


def run_check(overrides: list[str], here: bool) -> RunSpec:
    """The run command's check, as `make sweep` hands it to the plan."""
    return check_settings(compose(overrides), here)


@pytest.mark.parametrize("path", sweep_files(), ids=lambda p: p.stem)
def test_sweep_yaml_is_valid_for_wandb_and_every_point_composes(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    assert wandb_sweeps.schema_violations_from_proposed_config(raw) == []
    assert raw["method"] == "grid" and "${args_no_hyphens}" in raw["command"]
    sweep = read_sweep(path)
    assert sweep.config() == raw
    points = sweep.grid()
    sizes = [len(spec["values"]) if "values" in spec else 1 for spec in sweep.parameters.values()]
    assert len(points) == math.prod(sizes) and len({tuple(p.items()) for p in points}) == len(points)
    for point in points:
        command = sweep.command_of(point)
        assert command[:3] == [sys.executable, "-m", "diffbench.run"]
        cfg = compose(overrides_of(command))
        assert check_settings(cfg).arm.label == trial_dir(build_spec(cfg)).parent.name
        assert cfg.seed == point["seed"]
        assert cfg.experiment == point.get("experiment", "custom")
        assert cfg.objective.head == point.get("head", cfg.objective.head)
        assert cfg.objective.weighting == point.get("weighting", cfg.objective.weighting)


def composed_arms(sweep: Sweep) -> Counter[tuple[str, str]]:
    """How many trials of each (head, weighting) a sweep runs, read from the composed configs."""
    configs = (compose(overrides_of(sweep.command_of(point))) for point in sweep.grid())
    return Counter((cfg.objective.head, cfg.objective.weighting) for cfg in configs)


GRID_WEIGHTINGS = ("elbo", "elbo_is", "eps", "own")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ("grid", {(head, weighting) for head in HEADS for weighting in GRID_WEIGHTINGS}),
        ("weightings", {("eps", weighting) for weighting in WEIGHTINGS}),
    ],
)
def test_grid_sweeps_run_exactly_their_head_weighting_pairs(obj: str, expected: set[tuple[str, str]]) -> None:
    sweep = load_sweep(obj)
    assert "experiment" not in sweep.parameters
    arms = composed_arms(sweep)
    assert set(arms) == expected and set(arms.values()) == {3}, "each pair once per seed 0, 1, 2"
    points = sweep.grid()
    trials = plan(sweep, SweepOptions(), run_check)
    dirs = [t.directory for t in trials]
    assert len(set(dirs)) == len(points) == len(trials)
    assert [t.point for t in trials] == points
    for point, trial in zip(points, trials, strict=True):
        directory = trial.directory
        assert directory.parent.name == Arm(point["head"], point["weighting"]).label == trial.spec.arm.label
        assert directory.parents[1].name == "default-digits" and directory.name.startswith(
            f"s{point['seed']}-"
        )
    assert len({d.parent.name for d in dirs}) == len(expected), "one arm folder per pair"


def pairs_of_grid_sweeps() -> list[tuple[str, str]]:
    return sorted(set(composed_arms(load_sweep("grid"))) | set(composed_arms(load_sweep("weightings"))))


@pytest.mark.slow
def test_every_grid_pair_trains_one_step() -> None:
    """Every head × weighting the grid sweeps name composes, builds and takes a finite step, so
    no trial of a long sweep is the first to find a pair that cannot train."""
    pairs = pairs_of_grid_sweeps()
    assert len(pairs) == len(HEADS) * len(GRID_WEIGHTINGS) + len(set(WEIGHTINGS) - set(GRID_WEIGHTINGS))
    torch.manual_seed(0)
    small = [*TINY, "model.base_channels=8", "data.batch_size=4"]
    datamodule = build_datamodule(spec_of(small))
    batch = next(iter(datamodule.train_dataloader()))
    for head, weighting in pairs:
        module = build_module(
            spec_of([*small, f"head={head}", f"weighting={weighting}"]), datamodule.num_levels
        )
        assert (module.head.name, module.weighting.name) == (head, weighting)
        loss = module.training_step(batch, 0)
        loss.backward()
        assert torch.isfinite(loss), (head, weighting)
        grads = [p.grad for p in module.net.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), (head, weighting)


@pytest.mark.slow
@pytest.mark.parametrize(("lr_of", "arms"), [("all", 6), ("grid", 16)])
def test_lr_check_runs_each_arm_at_three_learning_rates_on_seed_zero(lr_of: str, arms: int) -> None:
    sweep = with_options(load_sweep("lr", lr_of), "smoke", None, None, ["run.reuse=true"])
    assert wandb_sweeps.schema_violations_from_proposed_config(sweep.config()) == []
    assert sweep.name == f"diffbench-{lr_of}-lr"
    points = sweep.grid()
    assert len(points) == arms * len(LEARNING_RATES)
    configs = [compose(overrides_of(sweep.command_of(point))) for point in points]
    assert {cfg.seed for cfg in configs} == {0}
    by_arm: dict[str, list[float]] = {}
    for cfg in configs:
        by_arm.setdefault(Arm(cfg.objective.head, cfg.objective.weighting).label, []).append(cfg.optim.lr)
    assert len(by_arm) == arms
    assert all(sorted(rates) == sorted(LEARNING_RATES) for rates in by_arm.values())
    trials = plan(sweep, SweepOptions(), run_check)
    assert len({t.directory for t in trials}) == len(points), "each learning rate has its own trial"


def test_lr_check_summarises_each_learning_rate_apart(tmp_path: Path) -> None:
    sweep = load_sweep("lr")
    spec = spec_of([])  # any spec: the summary reads each trial's point and directory
    trials = [Trial(p, spec, (), tmp_path / f"trial{i}") for i, p in enumerate(sweep.grid())]
    sets = summary_sets(trials)
    assert [(setting.rate, setting.clip) for setting, _ in sets] == [(r, None) for r in LEARNING_RATES]
    for setting, subset in sets:
        assert subset == [t for t in trials if t.point["optim.lr"] == setting.rate]
        assert len(subset) == 6
    stems = [summary_stem(sweep, setting) for setting, _ in sets]
    assert stems == [
        "summary-diffbench-all-lr-lr3e-04",
        "summary-diffbench-all-lr-lr1e-03",
        "summary-diffbench-all-lr-lr3e-03",
    ]
    for stem, (_, subset) in zip(stems, sets, strict=True):
        summarize_trials([t.directory for t in subset], tmp_path / stem)
    assert len(list(tmp_path.glob("*.md"))) == 3, "one table file per learning rate"
    plain = [Trial(p, spec, (), t.directory) for p, t in zip(load_sweep("all").grid(), trials)]
    assert len(plain) == 18 and summary_sets(plain) == [(None, plain)]
    assert summary_stem(load_sweep("all"), None) == "summary-diffbench-all"


def test_clipped_and_unclipped_trials_at_one_rate_get_tables_of_their_own(tmp_path: Path) -> None:
    """OBJ=tuned's stage 2 trains an arm at lr 1e-3 unclipped (the default) and possibly at lr 1e-3
    with clipping (a tuned setting): pooling them would count one arm's two settings as seeds."""
    spec = spec_of([])
    points = [
        {"experiment": "eps_simple", "seed": 0, "optim.lr": 1e-3},
        {"experiment": "eps_simple", "seed": 0, "optim.lr": 1e-3, CLIP_KEY: CLIP_OFF},
        {"experiment": "eps_simple", "seed": 0, "optim.lr": 1e-3, CLIP_KEY: 1.0},
        {"experiment": "eps_simple", "seed": 0, "optim.lr": 2e-4, CLIP_KEY: 1.0},
    ]
    trials = [Trial(p, spec, (), tmp_path / f"trial{i}") for i, p in enumerate(points)]
    sets = summary_sets(trials)
    assert [(len(subset), setting.text) for setting, subset in sets] == [
        (2, "optim.lr=0.001"),
        (1, f"optim.lr=0.001 {CLIP_KEY}=1"),
        (1, f"optim.lr=0.0002 {CLIP_KEY}=1"),
    ]
    sweep = load_sweep("eps")
    assert [summary_stem(sweep, setting) for setting, _ in sets] == [
        "summary-diffbench-eps-lr1e-03",
        "summary-diffbench-eps-lr1e-03-clip1e+00",
        "summary-diffbench-eps-lr2e-04-clip1e+00",
    ]


def test_lr_of_needs_obj_lr_and_another_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--obj", "all", "--lr-of", "grid"]) == 2
    assert "only applies to OBJ=lr" in capsys.readouterr().err
    assert main(["--obj", "lr", "--lr-of", "lr"]) == 2
    assert main(["--obj", "lr", "--lr-of", "epsilon"]) == 2
    assert "unknown OBJ 'epsilon'" in capsys.readouterr().err


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
    assert set(load_sweep(obj).parameters["experiment"]["values"]) == expected


def test_seeds_count_or_list() -> None:
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,5,7") == [0, 5, 7]
    with pytest.raises(ConfigError):
        parse_seeds("three")


def test_unknown_obj_lists_valid_values(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--obj", "epsilon"]) == 2
    err = capsys.readouterr().err
    listed = set(err.split("Valid values: ")[1].split(" (")[0].split(", "))
    assert {"all", "grid", "weightings", "lr", "eps", "simple", "elbo", "x0_elbo"} <= listed


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


@pytest.mark.slow
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
    report = tmp_path / "runs" / "report" / config_group(RunDir(trials[0]).read_config())
    table = json.loads((report / "report.json").read_text())["table"]
    assert len(table["eps_simple"]["nll_vlb_bpd"]["seeds"]) == 2 and (report / "report.html").is_file()
    assert "[report]" in first.stdout
    written = {t: (t / "results.json").stat().st_mtime_ns for t in trials}
    second = sweep_cli(tmp_path, *args)
    assert second.returncode == 0
    for trial in trials:
        assert (trial / "results.json").stat().st_mtime_ns == written[trial]
        assert "already complete" in (trial / "sweep.log").read_text()


@pytest.mark.slow
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


@pytest.mark.slow
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
