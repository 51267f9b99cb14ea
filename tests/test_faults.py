"""Fault injection: every bad input is one paragraph and exit code 2 before anything is trained or
written; another run's directory is never overwritten; a diverged arm stops cleanly and is
listed, not averaged; a second writer is refused; a partial run is not evaluated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY
from diffbench import launch
from diffbench.analysis.collect import Incomplete, load_run
from diffbench.cli import evaluate as evaluate_cli
from diffbench.cli import report as report_cli
from diffbench.cli import run as run_cli
from diffbench.cli.checks import check_settings
from diffbench.config import ConfigError, compose
from diffbench.plan import SweepOptions, plan, point_label, read_sweep, sweeps_dir
from diffbench.rundir import RESULTS, RunDir
from diffbench.sweep import main as sweep_main

BAD_INPUTS = [
    (["run.root=runs/" + "a" * 300], "no name in it over 255 bytes"),
    (["experiment=" + "a" * 300], "unknown experiment"),
    (["wandb.project=" + "p" * 200], "1 to 128 characters"),
    (["trainér.max_steps=3"], "Did you mean trainer.max_steps"),
    (["experiment=eps_simpel"], "eps_simple"),
    (["trainer.max_stepz=3"], "Did you mean"),
    (["seed=abc"], "wrong type"),
    (["trainer.max_steps=abc"], "expects a int"),
    (["optim.lr=fast"], "expects a float"),
    (["eps_simple"], "key=value"),
    (["optim=3"], "group of settings"),
    (["profile=turbo"], "turbo"),
    (["trainer.max_steps=0"], "trainer.max_steps=0"),
    (["trainer.max_steps=-5"], "trainer.max_steps=-5"),
    (["data.batch_size=0"], "data.batch_size=0"),
    (["data.eval_batch_size=-1"], "data.eval_batch_size=-1"),
    (
        ["diffusion.num_timesteps=1"],
        "diffusion.num_timesteps=1 is not valid: diffusion.num_timesteps must be an integer between 2",
    ),
    (["diffusion.schedule=cosinus"], "diffusion.schedule must be one of linear, cosine"),
    (["diffusion.variance=medium"], "diffusion.variance='medium'"),
    (["sample.variance=huge"], "sample.variance='huge'"),
    (["eval.sampler=heun"], "eval.sampler must be one of ancestral, ddim, sde, ode"),
    (["eval.num_samples=2"], "at least 4 samples"),
    (["trainer.precision=64-bits"], "trainer.precision must be one of"),
    (["head=noise"], "objective.head must be one of eps, x0, score, v"),
    (["weighting=simple"], "weighting=own"),
    (["weighting=snr"], "objective.weighting must be one of elbo"),
    (["seed=-1"], "seed must be an integer between 0 and 4294967295"),
    (["optim.lr=0"], "optim.lr=0"),
    (["optim.lr=-0.001"], "optim.lr must be a finite number above 0"),
    (["optim.ema_decay=1.0"], "optim.ema_decay=1.0"),
    (["run.checkpoint_every=0"], "run.checkpoint_every=0"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0"),
    (["eval.vlb_timesteps=7"], "eval.vlb_timesteps=7"),
    (["sample.num_images=-1"], "sample.num_images=-1"),
    (["eval.budget_base=-1"], "eval.budget_base=-1"),
    (["eval.budget_samples=2"], "eval.budget_samples=2"),
    (["eval.sampler_steps=0"], "eval.sampler_steps=0"),
    (["eval.sampler_steps=5000"], "eval.sampler_steps=5000"),
    (["eval.also_samplers=[ddim-0]"], "'ddim-0': its steps must be between 1 and"),
    (["eval.also_samplers=[ddim-5000]"], "'ddim-5000': its steps must be between 1 and"),
    (["eval.also_samplers=[ddim-ten]"], "'ddim-ten', which is not a sampler setting"),
    (["eval.also_samplers=[heun-10]"], "'heun-10', which is not a sampler setting"),
    (["eval.also_samplers=[ddim]"], "<sampler>-<steps>"),
    (["model.in_channels=3"], "channel"),
    (["model.image_size=16"], "8x8"),
    (["model.channel_mult=[1,2,2,2,2]"], "halves the image 4 time(s)"),
    (["data=imagenet"], "imagenet"),
    (["model=unet_huge"], "unet_huge"),
    (["run.dir=123"], "run.dir must be null or a path"),
    (["run.root="], "run.root must be a path"),
    (["run.dir=~/x"], "without a leading ~"),
    (["run.root=/proc/diffbench"], "/proc is not writable"),
    (["seed=4294967296"], "seed must be an integer between 0 and 4294967295"),
    (["seed=1.5"], "seed expects a int"),
    (["speed.threads=-1"], "speed.threads must be an integer between 0"),
    (["optim.weight_decay=nan"], "optim.weight_decay must be a finite number in [0, 10]"),
    (["optim.lr=inf"], "optim.lr must be a finite number above 0"),
    (["data.val_fraction=2"], "data.val_fraction must be a finite number in (0, 1)"),
    (["data.batch_size=" + "1" + "0" * 30], "data.batch_size must be an integer between 1 and 100000"),
    (["trainer.max_steps=" + "1" + "0" * 30], "trainer.max_steps must be an integer between 1 and"),
    (["model.base_channels=0"], "model.base_channels must be an integer between 1"),
    (["model.dropout=2"], "model.dropout must be a finite number in [0, 1)"),
    (["model.num_heads=3"], "does not divide"),
    (["trainer.devices=0"], "trainer.devices must be an integer between 1"),
    (["eval.sample_batch_size=0"], "eval.sample_batch_size must be an integer between 1"),
    (["eval.reference_split=bogus"], "eval.reference_split must be one of train, val, test"),
    (["eval.ode_rtol=-1"], "eval.ode_rtol must be a finite number in (0, 1)"),
    (["eval.ddim_eta=nan"], "eval.ddim_eta must be a finite number in [0, 1]"),
    (["wandb.entity=team/project"], "wandb.entity must be null or a W&B name"),
    (["wandb.mode=sometimes"], "wandb.mode must be one of auto, online, offline, disabled"),
    (["optim.lr=[1"], "cannot read the value of optim.lr='[1'"),
    (["experiment=../experiments/eps_simple"], "is not a name: experiment= takes the name"),
    (["experiment=/etc/hostname"], "is not a name: experiment= takes the name"),
    (["trainer.precision=16-mixed"], "trainer.precision=32-true"),
    pytest.param(
        ["trainer=gpu"],
        "trainer.accelerator=cpu",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused on machines without CUDA"),
    ),
]


def case_id(case: tuple | object) -> str:
    return " ".join(case.values[0] if hasattr(case, "values") else case[0])[:60]


@pytest.mark.parametrize(("args", "phrase"), BAD_INPUTS, ids=[case_id(c) for c in BAD_INPUTS])
def test_bad_input_is_one_paragraph_and_exit_2_with_nothing_written(
    args: list[str],
    phrase: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    code = run_cli.main(["experiment=eps_simple", *args] if "experiment" not in args[0] else args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert phrase in err, err
    assert err.startswith("diffbench.run: ") and "Traceback" not in err
    assert "\n\n" not in err, "one paragraph"
    assert list(tmp_path.iterdir()) == [], "nothing written"


def test_run_dir_that_is_a_file_and_a_broken_preset_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me\n")
    assert run_cli.main(["experiment=eps_simple", f"run.dir={tmp_path / 'afile'}"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me\n"
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "broken.yaml").write_text("objective: {head: eps\n")
    monkeypatch.setenv("DIFFBENCH_EXPERIMENTS", str(presets))
    assert run_cli.main(["experiment=broken"]) == 2
    err = capsys.readouterr().err
    assert "broken" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "presets"]


BAD_PRESETS = [
    ("objective: {head: eps, weighting: own}\ntraner: {max_steps: 5}\n", "unknown config key 'traner"),
    ("objective: {head: eps}\ntrainer: {max_stepz: 5}\n", "Did you mean trainer.max_steps"),
    ("- objective\n- trainer\n", "not a mapping of settings"),
    ("defaults:\n  - data: gmm\n", "a Hydra-style list"),
    ("defaults: {dataset: gmm}\n", "must map groups to names"),
    ("optim: {lr: fast}\n", "optim.lr='fast' in preset mine has the wrong type"),
    ("optim: {lr: -1.0e-3}\n", "optim.lr must be a finite number above 0"),
    ("objective: {head: eps\n", "is not valid YAML"),
]


@pytest.mark.parametrize(("text", "phrase"), BAD_PRESETS, ids=[p for _, p in BAD_PRESETS])
def test_a_preset_is_checked_as_the_command_line_is(
    text: str, phrase: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "mine.yaml").write_text(text)
    monkeypatch.setenv("DIFFBENCH_EXPERIMENTS", str(presets))
    monkeypatch.chdir(tmp_path)
    assert run_cli.main(["experiment=mine"]) == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and "mine" in err, err
    assert "Traceback" not in err and "\n\n" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["presets"], "nothing written"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "DIFFBENCH_THREADS": "1"}
    command = [sys.executable, "-m", "diffbench.run", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished eps_simple run (TINY) that the tests below try to damage."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    proc = run(["experiment=eps_simple", *TINY, f"run.dir={run_dir}"], run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def snapshot(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_another_configs_run_directory_is_refused_naming_the_differences(
    finished: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(finished)
    monkeypatch.chdir(finished.parent)
    assert run_cli.main(["experiment=x0_elbo", *TINY, f"run.dir={finished}"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err
    assert "objective.head ('eps' there, 'x0' here)" in err
    assert "objective.weighting ('own' there, 'elbo' here)" in err and "experiment" not in err
    assert snapshot(finished) == before


@pytest.mark.slow
def test_same_config_rerun_skips_and_touches_nothing(
    finished: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(finished)
    monkeypatch.chdir(finished.parent)
    assert run_cli.main(["experiment=eps_simple", *TINY, f"run.dir={finished}"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert snapshot(finished) == before


@pytest.mark.slow
def test_second_writer_is_refused_while_the_lock_is_held(
    finished: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    with RunDir(finished).exclusive(), pytest.raises(ConfigError, match="another diffbench process"):
        with RunDir(finished).exclusive():
            pass
    with RunDir(finished).exclusive():
        assert evaluate_cli.main([f"run_dir={finished}", "num_samples=8"]) == 2
    assert "another diffbench process" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["sampler=heun"], "eval.sampler must be one of"),
        (["num_samples=2"], "at least 4 samples"),
        (["steps=5000"], "eval.sampler_steps=5000"),
        (["eval.ode_rtol=0"], "eval.ode_rtol must be a finite number"),
        (["eval.reference_split=bogus"], "eval.reference_split must be one of"),
        (["model.base_channels=8"], "model.base_channels cannot be changed by evaluate"),
        (["experiment=x0_simple"], "experiment cannot be changed by evaluate"),
        (["eval.enabled=false"], "eval.enabled cannot be changed by evaluate"),
        (["steps=[1"], "cannot read the value of steps"),
    ],
)
def test_evaluate_checks_its_overrides_before_any_work(
    args: list[str], phrase: str, finished: Path, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(finished)
    assert evaluate_cli.main([f"run_dir={finished}", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and err.startswith("diffbench.evaluate: ") and "\n\n" not in err, err
    assert snapshot(finished) == before


@pytest.mark.slow
def test_evaluate_leaves_a_read_only_results_file_alone(
    finished: Path, capsys: pytest.CaptureFixture
) -> None:
    results = finished / RESULTS
    before = snapshot(finished)
    os.chmod(results, 0o444)
    try:
        assert evaluate_cli.main([f"run_dir={finished}", "num_samples=8"]) == 2
    finally:
        os.chmod(results, 0o644)
    assert "is read-only" in capsys.readouterr().err
    assert snapshot(finished) == before


@pytest.mark.slow
def test_report_out_that_cannot_be_a_folder_is_refused(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "afile").write_text("keep me\n")
    refusals = [(tmp_path / "afile", "afile is a file"), (Path("/proc/diffbench"), "/proc is not writable")]
    for out, reason in refusals:
        assert report_cli.main(["--runs", str(finished.parent), "--out", str(out)]) == 2
        assert reason in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
    assert (tmp_path / "afile").read_text() == "keep me\n"


def test_a_config_yaml_that_is_not_text_is_listed_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "config.yaml").write_bytes(b"\x00\xff\xfe")
    assert report_cli.main(["--runs", str(tmp_path / "runs"), "--no-figures"]) == 0
    assert "1 incomplete" in capsys.readouterr().out


@pytest.mark.slow
def test_partial_run_is_not_evaluated(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)  # its checkpoints stop at step 2
    config = (run_dir / "config.yaml").read_text().replace("max_steps: 2", "max_steps: 6")
    (run_dir / "config.yaml").write_text(config)  # as if killed at step 2 of 6
    assert evaluate_cli.main([f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "stopped at step 2 of trainer.max_steps=6" in err and "resumes" in err


@pytest.mark.slow
def test_diverged_arm_stops_cleanly_and_is_listed_not_averaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    diverging = ["experiment=eps_elbo", *TINY, "trainer.max_steps=6", "optim.lr=1e8", "optim.warmup_steps=1"]
    monkeypatch.chdir(tmp_path)
    assert run_cli.main([*diverging, f"run.dir={run_dir}"]) == 0
    stderr = capsys.readouterr().err
    assert "diverged" in stderr and "optim.lr" in stderr
    text = (run_dir / "results.json").read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"results.json holds {constant}: not strict JSON")

    results = json.loads(text, parse_constant=refuse)
    assert results["status"] == "diverged" and results["metrics"] == {}
    assert 1 <= results["diverged_at_step"] <= 6
    assert not list(run_dir.glob("samples_*.png")), "nothing evaluated"
    listed = load_run(run_dir)
    assert isinstance(listed, Incomplete) and "diverged at step" in listed.reason
    assert run_cli.main([*diverging, f"run.dir={run_dir}"]) == 0
    assert "already diverged" in capsys.readouterr().out


SWEEP_HEAD = (
    "name: mine\nprogram: diffbench.run\nmethod: grid\n"
    "command: ['${interpreter}', -m, '${program}', '${args_no_hyphens}']\n"
)
RATES = [1e-4 * (i + 1) for i in range(200)]
BAD_SWEEPS = [
    (
        SWEEP_HEAD + "parameters: {experiment: {value: eps_simple}, seed: {values: [0, 4294967296]}}\n",
        "trial experiment=eps_simple seed=4294967296 would be refused: seed=4294967296 is not valid",
    ),
    (
        SWEEP_HEAD + "parameters: {experiment: {value: eps_simple}, optim.lr: {values: [1.0e-3, -1.0]}}\n",
        "trial experiment=eps_simple optim.lr=-1.0 would be refused",
    ),
    (
        SWEEP_HEAD + f"parameters: {{seed: {{values: {list(range(200))}}}, optim.lr: {{values: {RATES}}}}}\n",
        "has 40000 trials, more than 20000",
    ),
    (SWEEP_HEAD + "parameters: {seed: {values: []}}\n", "parameter 'seed' has neither value: nor"),
    (SWEEP_HEAD, "it has no parameters"),
    ("- name\n- command\n", "it is not a mapping of sweep settings"),
    (SWEEP_HEAD + "parameters: {seed: [0, 1\n", "is not valid YAML"),
]


@pytest.mark.parametrize(("text", "phrase"), BAD_SWEEPS, ids=[p[:40] for _, p in BAD_SWEEPS])
def test_a_sweep_checks_every_trial_before_starting_any(
    text: str, phrase: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "mine.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert sweep_main(["--obj", "mine", "--local"]) == 2
    err = capsys.readouterr().err.strip()
    assert phrase in err and err.startswith("diffbench.sweep: ") and "Traceback" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["sweeps"], "no trial started, nothing written"


@pytest.mark.parametrize(
    ("seeds", "phrase"),
    [("0,0", "names seed 0 more than once"), ("1001", "a count from 1 to 1000"), ("-3", "no usable")],
)
def test_sweep_seed_lists_that_would_miscount_are_refused(
    seeds: str, phrase: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert sweep_main(["--obj", "eps_simple", "--seeds", seeds, "--local"]) == 2
    assert phrase in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_two_names_for_one_run_run_and_count_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "also_eps_simple.yaml").write_text("objective: {name: also, head: eps, weighting: own}\n")
    monkeypatch.setenv("DIFFBENCH_EXPERIMENTS", str(presets))
    monkeypatch.chdir(tmp_path)
    sweep = read_sweep(sweeps_dir() / "all.yaml")
    sweep.parameters["experiment"] = {"values": ["eps_simple", "also_eps_simple", "x0_simple"]}
    points = sweep.grid()
    kept = plan(sweep, SweepOptions(), lambda overrides, here: check_settings(compose(overrides), here))
    assert len(points) == 9 and len(kept) == len({t.directory for t in kept}) == 6
    assert {t.point["experiment"] for t in kept} == {"eps_simple", "x0_simple"}
    (same,) = kept[0].same
    assert point_label(same) == "experiment=also_eps_simple seed=0 profile=default data=digits"
    # The command names each such point once, before anything runs.
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "two.yaml").write_text(yaml.safe_dump(sweep.config(), sort_keys=False))
    monkeypatch.setattr(launch, "run", lambda *args: launch.Outcome(0))
    assert sweep_main(["--obj", "two", "--local"]) == 0
    assert (
        "experiment=also_eps_simple seed=0 profile=default data=digits is the same run as"
        in capsys.readouterr().out
    )
