"""One place decides validity: the schema judges every value (on the command line and read back from
a run directory), `rules` the rules between settings; a damaged run directory is refused by
evaluate before anything is computed and listed by the report, which goes on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, spec_of
from diffbench import rules
from diffbench.cli import evaluate as evaluate_cli
from diffbench.cli import report as report_cli
from diffbench.config import ConfigError, compose
from diffbench.core.arms import Arm
from diffbench.rundir import CHECKPOINTS, CONFIG, RESULTS, RunDir
from diffbench.schema import SCHEMA, is_int, is_number, stored_problem
from fabricate import write_run

DAMAGED_CONFIGS = [
    ("experiment: [unclosed\n", "is not valid YAML"),
    ("- a\n- list\n", "holds a YAML list, not a mapping of settings"),
    (
        "trainer: {max_steps: abc}\n",
        "trainer.max_steps='abc' has the wrong type: trainer.max_steps expects a int",
    ),
    ("seed: -3\n", "seed=-3 is not valid: seed must be an integer between 0"),
    ("optim: 3\n", "optim=3 has the wrong type: optim is a group of settings"),
]


def test_one_integer_and_one_number_check() -> None:
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(0.5) and not is_number(False)
    assert not is_number(float("nan")) and is_number(float("inf"), finite=False)


def test_typed_model_and_trainer_settings_record_as_before() -> None:
    spec = spec_of(["experiment=eps_simple", *TINY])
    assert spec.model.channel_mult == (1, 2) and spec.model.base_channels == 16
    assert spec.trainer.max_steps == spec.max_steps == 2 and not spec.trainer.wants_gpu
    record = spec.record()
    assert record["model"]["channel_mult"] == [1, 2] and record["trainer"]["val_check_interval"] == 2
    assert set(record["model"]) == {k.split(".")[1] for k in SCHEMA if k.startswith("model.")} - {"name"}


def test_the_schema_is_the_one_type_check_for_every_source() -> None:
    """Compose checks keys; the value's type is the schema's, with the same words for the command line
    and a stored config.yaml."""
    cfg = compose(["seed=1.5"])
    with pytest.raises(ConfigError, match="seed=1.5 has the wrong type: seed expects a int"):
        rules.check_settings(cfg)
    assert stored_problem({"seed": 1.5}) == (
        "seed=1.5 has the wrong type: seed expects a int (e.g. seed=1), got a float"
    )


def test_a_stored_config_passes_over_unknown_keys_and_reads_old_names(tmp_path: Path) -> None:
    (tmp_path / CONFIG).write_text("objective: {head: x0, weighting: simple}\nremoved_setting: 3\n")
    config, problem = RunDir(tmp_path).read_config_or_reason()
    assert problem is None and config is not None
    assert config["objective"]["weighting"] == "own" and config["removed_setting"] == 3
    assert RunDir(tmp_path / "none").read_config_or_reason() == (None, None)


@pytest.mark.parametrize(("text", "phrase"), DAMAGED_CONFIGS, ids=[p for _, p in DAMAGED_CONFIGS])
def test_a_damaged_config_yaml_is_read_back_with_its_reason(tmp_path: Path, text: str, phrase: str) -> None:
    (tmp_path / CONFIG).write_text(text)
    config, problem = RunDir(tmp_path).read_config_or_reason()
    assert config is None and problem is not None and phrase in problem, problem


def test_a_config_yaml_that_is_not_text_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / CONFIG).write_bytes(b"\xff\xfe\x00garbage")
    assert "is not text" in str(RunDir(tmp_path).read_config_or_reason()[1])


def test_results_fields_of_the_wrong_type_are_unreadable(tmp_path: Path) -> None:
    RunDir(tmp_path).write_results({"status": "complete", "metrics": [1, 2]})
    results, reason = RunDir(tmp_path).read_results_or_reason()
    assert results is None and reason == f"{RESULTS} unreadable: its metrics is a JSON list, not an object"


@pytest.fixture
def trained_looking(tmp_path: Path) -> RunDir:
    """A run directory as training leaves it (config.yaml, results.json, a checkpoint at the last
    step), without training: evaluate must refuse it before it loads the network."""
    spec = spec_of(["experiment=eps_simple", *TINY, f"run.dir={tmp_path}"])
    run_dir = RunDir(tmp_path)
    run_dir.write_config(spec)
    run_dir.write_results({"status": "complete", "seed": 0, "metrics": {"fd_digits": 1.0}})
    run_dir.checkpoints.mkdir()
    torch.save({"global_step": spec.max_steps, "state_dict": {}}, run_dir.checkpoints / "last.ckpt")
    return run_dir


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("damage", "phrase"),
    [
        (lambda d: (d / CONFIG).write_text("experiment: [unclosed\n"), f"its {CONFIG} is not valid YAML"),
        (
            lambda d: (d / CONFIG).write_text(
                (d / CONFIG).read_text().replace("max_steps: 2", "max_steps: two")
            ),
            "trainer.max_steps='two' has the wrong type",
        ),
        (
            lambda d: (d / CONFIG).write_text((d / CONFIG).read_text().replace("  max_steps: 2\n", "")),
            "is not a run this diffbench can evaluate: the config has no trainer.max_steps setting",
        ),
        (
            lambda d: (d / RESULTS).write_text(json.dumps({"status": "complete", "schema_version": 99})),
            "schema_version 99 is not one this diffbench reads",
        ),
        (
            lambda d: (d / RESULTS).write_text(json.dumps({"status": "complete", "evaluation": [1]})),
            "its evaluation is a JSON list, not an object",
        ),
    ],
    ids=[
        "config not YAML",
        "config wrong type",
        "config cut short",
        "results unknown schema",
        "results wrong type",
    ],
)
def test_evaluate_refuses_a_damaged_run_directory_before_computing(
    trained_looking: RunDir,
    damage: object,
    phrase: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    damage(trained_looking.path)  # type: ignore[operator]
    before = snapshot(trained_looking.path)

    def computed(*args: object) -> dict:
        raise AssertionError("evaluate computed something")

    monkeypatch.setattr(evaluate_cli, "reevaluate", computed)
    assert evaluate_cli.main([f"run_dir={trained_looking.path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffbench.evaluate: ") and phrase in err, err
    assert "othing was" in err and "Traceback" not in err and "\n" not in err
    assert snapshot(trained_looking.path) == before


def test_evaluate_goes_as_far_as_computing_for_an_intact_directory(
    trained_looking: RunDir, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The refusals above are the damage's: the same directory intact reaches the evaluation."""
    reached = []
    monkeypatch.setattr(evaluate_cli, "reevaluate", lambda *args: reached.append(args) or {"metrics": {}})
    assert evaluate_cli.main([f"run_dir={trained_looking.path}", "num_samples=6"]) == 0
    (spec, run_dir, checkpoint, results), *_ = reached
    assert spec.evaluation.num_samples == 6 and checkpoint == run_dir.path / CHECKPOINTS / "last.ckpt"
    assert results["metrics"] == {"fd_digits": 1.0}


def test_the_report_lists_an_unreadable_config_and_reports_the_other_runs(tmp_path: Path) -> None:
    for arm in (Arm("eps", "own"), Arm("eps", "elbo")):
        for seed in range(3):
            write_run(tmp_path, arm, seed, {"nll_vlb_bpd": 4.0 + seed * 0.1 + (arm.weighting == "elbo")})
    garbled = write_run(tmp_path, Arm("x0", "own"), 0, {"nll_vlb_bpd": 4.0}, name="garbled")
    (garbled / CONFIG).write_text("experiment: [unclosed\n")
    mistyped = write_run(tmp_path, Arm("x0", "own"), 1, {"nll_vlb_bpd": 4.0}, name="mistyped")
    config = yaml.safe_load((mistyped / CONFIG).read_text())
    config["trainer"]["max_steps"] = "a hundred"
    (mistyped / CONFIG).write_text(yaml.safe_dump(config))
    assert report_cli.main(["--runs", str(tmp_path), "--no-figures"]) == 0
    (group,) = [p for p in (tmp_path / "report").iterdir() if p.is_dir()]
    payload = json.loads((group / "report.json").read_text())
    assert set(payload["table"]) == {"eps_simple", "eps_elbo"}
    reasons = {Path(item["directory"]).name: item["reason"] for item in payload["incomplete"]}
    assert "is not valid YAML" in reasons["garbled"]
    assert "trainer.max_steps='a hundred' has the wrong type" in reasons["mistyped"]
