"""Evaluation wiring: ground truth on gmm, re-evaluation of a finished run, clear failures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import TINY, isolate, spec_of
from diffbench.cli.evaluate import main as evaluate_main
from diffbench.core.diffusion import NoiseSchedule
from diffbench.evaluation.groundtruth import logsnr_timesteps
from diffbench.pipeline import train

GMM = ["data=gmm", "data.num_train=256", "data.num_val=64", "data.num_test=64", "data.num_components=4"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished x0_elbo run (TINY), trained once for the evaluation command's tests."""
    run_dir = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as patch:
        isolate(patch, tmp_path_factory)
        train(spec_of(["experiment=x0_elbo", *TINY, f"run.dir={run_dir}"]))
    return run_dir


@pytest.mark.slow
def test_gmm_run_records_ground_truth_metrics(tmp_path: Path) -> None:
    results = train(spec_of(["experiment=eps_simple", *TINY, *GMM, f"run.dir={tmp_path}"]))
    metrics = results["metrics"]
    for key in (
        "nll_exact_bpd",
        "eps_star_mse",
        "eps_star_elbo_bpd",
        "sample_true_nll_bpd",
        "nll_vlb_bpd",
        "nll_ode_bpd",
        "fd_digits",
    ):
        assert key in metrics and metrics[key] == metrics[key], key
    with (tmp_path / "eps_star_distance.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    expected_t, _ = logsnr_timesteps(NoiseSchedule("linear", 20), 20)
    assert [int(float(r["t"])) for r in rows] == expected_t.tolist()
    assert metrics["eps_star_mse"] == pytest.approx(
        sum(float(r["mse_to_eps_star"]) for r in rows) / len(rows)
    )
    assert results["evaluation"]["nll_ode_settings"]["dequantization"].startswith("none")
    assert (tmp_path / "eps_star_distance.png").is_file()
    (last,) = [row for row in results["budgets"] if row["step"] == 2]
    assert {"eps_star_mse", "eps_star_elbo_bpd", "val_vlb_bpd", "val_eps_mse"} <= set(last)


@pytest.mark.slow
def test_also_samplers_score_the_samples_again_from_the_same_noise(tmp_path: Path) -> None:
    """DDIM with η = 0 is deterministic given its starting noise, and every sampler of a run starts
    from the same seeded stream: the main sampler again as an extra gives the same numbers exactly."""
    overrides = ["eval.sampler_steps=10", "eval.also_samplers=[ddim-10,ancestral-4]"]
    results = train(spec_of(["experiment=eps_simple", *TINY, *overrides, f"run.dir={tmp_path}"]))
    metrics = results["metrics"]
    assert metrics["fd_digits@ddim-10"] == metrics["fd_digits"]
    assert metrics["kid_digits@ddim-10"] == metrics["kid_digits"]
    assert metrics["fd_digits@ancestral-4"] != metrics["fd_digits"]
    settings = results["evaluation"]["sample_settings@ancestral-4"]
    assert (settings["sampler"], settings["steps"], settings["nfe_per_batch"]) == ("ancestral", 4, 4)
    assert results["evaluation"]["sample_settings@ddim-10"]["eta"] == 0.0


@pytest.mark.slow
def test_evaluate_cli_reevaluates_a_finished_run(finished: Path) -> None:
    before = json.loads((finished / "results.json").read_text())
    assert before["evaluation"]["sample_settings"]["sampler"] == "ddim"
    assert evaluate_main([f"run_dir={finished}", "sampler=ancestral", "steps=5", "num_samples=6"]) == 0
    after = json.loads((finished / "results.json").read_text())
    settings = after["evaluation"]["sample_settings"]
    assert (settings["sampler"], settings["steps"], settings["num_samples"]) == ("ancestral", 5, 6)
    assert after["steps"] == before["steps"] and after["experiment"] == "x0_elbo"
    assert (finished / "samples_ancestral.png").is_file()
    with (finished / "eps_mse_by_t.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) > 3


@pytest.mark.slow
def test_evaluate_cli_checks_its_overrides_before_evaluating(
    finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An evaluation setting is checked by the same rules as a run's, before anything is computed:
    results.json is untouched."""
    before = (finished / "results.json").read_bytes()
    for override, phrase in (
        ("steps=0", "eval.sampler_steps=0"),
        ("sampler=heun", "eval.sampler must be one of"),
    ):
        assert evaluate_main([f"run_dir={finished}", override]) == 2
        assert phrase in capsys.readouterr().err
    assert (finished / "results.json").read_bytes() == before


def test_evaluate_cli_rejects_a_directory_without_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert evaluate_main([f"run_dir={tmp_path}"]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert evaluate_main([]) == 2
