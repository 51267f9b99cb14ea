"""Fault injection: every bad input is one paragraph and exit code 2 before anything is trained or
written; another run's directory is never overwritten; a diverged arm stops cleanly and is
listed, not averaged; a second writer is refused; a partial run is not evaluated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from diffbench.analysis.collect import Incomplete, load_run
from diffbench.cli import evaluate as evaluate_cli
from diffbench.cli import run as run_cli
from diffbench.config import ConfigError
from diffbench.rundir import RunDir

pytestmark = pytest.mark.slow  # end to end: trains, runs commands or simulates thousands of reports

BAD_INPUTS = [
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
]


@pytest.mark.parametrize(("args", "phrase"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
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


def test_same_config_rerun_skips_and_touches_nothing(finished: Path) -> None:
    before = snapshot(finished)
    proc = run(["experiment=eps_simple", *TINY, f"run.dir={finished}"], finished.parent)
    assert proc.returncode == 0 and "already complete" in proc.stdout
    assert snapshot(finished) == before


def test_second_writer_is_refused_while_the_lock_is_held(
    finished: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    with RunDir(finished).exclusive(), pytest.raises(ConfigError, match="another diffbench process"):
        with RunDir(finished).exclusive():
            pass
    with RunDir(finished).exclusive():
        assert evaluate_cli.main([f"run_dir={finished}", "num_samples=8"]) == 2
    assert "another diffbench process" in capsys.readouterr().err


def test_partial_run_is_not_evaluated(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    proc = run(["experiment=eps_simple", *TINY, "eval.enabled=false", f"run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = (run_dir / "config.yaml").read_text().replace("max_steps: 2", "max_steps: 6")
    (run_dir / "config.yaml").write_text(config)  # as if killed at step 2 of 6
    assert evaluate_cli.main([f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "stopped at step 2 of trainer.max_steps=6" in err and "resumes" in err


def test_diverged_arm_stops_cleanly_and_is_listed_not_averaged(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    diverging = ["experiment=eps_elbo", *TINY, "trainer.max_steps=6", "optim.lr=1e8", "optim.warmup_steps=1"]
    proc = run([*diverging, f"run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "diverged" in proc.stderr and "optim.lr" in proc.stderr
    text = (run_dir / "results.json").read_text()

    def refuse(constant: str) -> None:
        raise AssertionError(f"results.json holds {constant}: not strict JSON")

    results = json.loads(text, parse_constant=refuse)
    assert results["status"] == "diverged" and results["metrics"] == {}
    assert 1 <= results["diverged_at_step"] <= 6
    assert not list(run_dir.glob("samples_*.png")), "nothing evaluated"
    listed = load_run(run_dir)
    assert isinstance(listed, Incomplete) and "diverged at step" in listed.reason
    again = run([*diverging, f"run.dir={run_dir}"], tmp_path)
    assert again.returncode == 0 and "already diverged" in again.stdout
