"""The run-directory contract: names, the results.json schema and its upgrade, atomic writes."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import spec_of
from diffbench import atomic
from diffbench.config import ConfigError
from diffbench.core.arms import Arm
from diffbench.rundir import (
    EPS_MSE_BY_T,
    RESULTS,
    SCHEMA_VERSION,
    RunDir,
    config_hash,
    trial_dir,
    trials_root,
    upgrade,
)


def test_arm_labels_keep_the_six_names_and_name_the_grid() -> None:
    assert Arm("eps", "own").label == "eps_simple" and Arm("x0", "elbo").label == "x0_elbo"
    assert Arm("v", "minsnr").label == "v_minsnr" and Arm("score", "elbo_is").label == "score_elbo_is"


def test_an_arm_is_a_value_that_parses_its_own_label() -> None:
    for head in ("eps", "x0", "score", "v"):
        for weighting in ("elbo", "elbo_is", "eps", "minsnr", "own"):
            arm = Arm(head, weighting)
            assert Arm.parse(arm.label) == arm and hash(Arm.parse(arm.label)) == hash(arm)
    # The schema-1 spelling of the head's own MSE is normalised; the head-named weighting is the
    # same objective but another arm (OBJ=grid trains both as a sanity check).
    assert Arm("x0", "simple") == Arm("x0", "own") == Arm.parse("x0_simple")
    assert Arm("eps", "eps") != Arm("eps", "own") and Arm("eps", "eps").objective == Arm("eps", "own")
    assert Arm("x0", "eps").objective == Arm("x0", "eps")
    assert sorted([Arm("score", "elbo"), Arm("eps", "own"), Arm("eps", "elbo")], key=lambda a: a.order) == [
        Arm("eps", "elbo"),
        Arm("eps", "own"),
        Arm("score", "elbo"),
    ]
    for label in ("unet_elbo", "eps_nonsense"):
        with pytest.raises(ValueError, match="unknown"):
            Arm.parse(label)
    with pytest.raises(ValueError, match="unknown weighting"):
        Arm("eps", "vlb")


def test_results_round_trip_with_the_schema_version(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path)
    run_dir.write_results({"status": "complete", "head": "eps", "weighting": "own", "arm": "eps_simple"})
    stored = json.loads((tmp_path / RESULTS).read_text())
    assert stored["schema_version"] == SCHEMA_VERSION
    assert run_dir.complete_results() == stored
    run_dir.write_results({"status": "diverged"})
    assert run_dir.complete_results() is None and run_dir.read_results()["status"] == "diverged"


def test_version_one_results_are_upgraded(tmp_path: Path) -> None:
    old = {
        "status": "complete",
        "head": "x0",
        "weighting": "simple",
        "metrics": {"eval_wall_time_s": 3.0, "a": 1.0},
    }
    (tmp_path / RESULTS).write_text(json.dumps(old))
    new = RunDir(tmp_path).read_results()
    assert (new["weighting"], new["arm"], new["schema_version"]) == ("own", "x0_simple", 2)
    assert new["metrics"] == {"a": 1.0} and new["eval_wall_time_s"] == 3.0
    assert upgrade(new) == new


def test_curves_round_trip_and_broken_ones_read_as_missing(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path)
    run_dir.write_curve(EPS_MSE_BY_T, [1, 10, 100], [0.5, 0.25, 0.125])
    assert run_dir.read_curve(EPS_MSE_BY_T) == ([1.0, 10.0, 100.0], [0.5, 0.25, 0.125])
    assert (tmp_path / EPS_MSE_BY_T.csv).read_text().splitlines()[0] == "t,eps_mse"
    (tmp_path / EPS_MSE_BY_T.csv).write_text("t,eps_mse\n1,notanumber\n")
    assert run_dir.read_curve(EPS_MSE_BY_T) is None


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic.write_json(target, {"old": True})

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic.save_with(target, crash)
    assert json.loads(target.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["results.json"]


def test_concurrent_writers_use_distinct_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    with atomic.replacing(target) as first, atomic.replacing(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("a")
        second.write_text("b")
    assert target.read_text() == "a"


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_new_files_follow_the_umask_and_replacements_keep_their_mode(tmp_path: Path, umask_022: None) -> None:
    new = tmp_path / "new.json"
    atomic.write_json(new, {})
    plain = tmp_path / "plain.txt"
    plain.write_text("as open() makes it")
    assert stat.S_IMODE(new.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o644
    atomic.save_with(new, lambda tmp: torch.save({"w": 1}, tmp))
    assert stat.S_IMODE(new.stat().st_mode) == 0o644
    os.chmod(new, 0o640)
    atomic.write_text(new, "replaced")
    assert stat.S_IMODE(new.stat().st_mode) == 0o640 and new.read_text() == "replaced"
    os.umask(0o077)
    private = tmp_path / "private.txt"
    atomic.write_text(private, "x")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_a_read_only_file_is_not_replaced_even_by_root(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    atomic.write_json(target, {"keep": True})
    os.chmod(target, 0o444)
    with pytest.raises(ConfigError, match="read-only"):
        atomic.write_json(target, {"keep": False})
    assert json.loads(target.read_text()) == {"keep": True}
    assert os.listdir(tmp_path) == ["results.json"]


def test_writable_folder_is_tried_not_read_from_permission_bits(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    assert atomic.writable_folder(tmp_path / "new" / "deeper")
    assert not atomic.writable_folder(tmp_path / "afile" / "sub")
    assert "afile is a file" in atomic.unwritable_reason(tmp_path / "afile" / "sub")
    assert not atomic.writable_folder(Path("/proc/diffbench-test"))
    assert os.listdir(tmp_path) == ["afile"], "the probe leaves nothing behind"


def test_trial_dir_is_named_by_arm_seed_and_config(tmp_path: Path) -> None:
    base = ["head=v", "weighting=minsnr", "seed=4"]
    cfg = spec_of([*base, f"run.root={tmp_path}"])
    path = trial_dir(cfg)
    assert path == tmp_path / "trials" / "default-digits" / "v_minsnr" / f"s4-{config_hash(cfg)}"
    assert trials_root(path) == tmp_path / "trials" / "default-digits"
    moved = spec_of([*base, "run.root=elsewhere", "wandb.project=p", "report.margins.fd_digits=3"])
    assert config_hash(moved) == config_hash(cfg)
    assert config_hash(spec_of([*base, "optim.lr=0.1"])) != config_hash(cfg)


def test_a_preset_and_its_head_weighting_pair_are_one_trial(tmp_path: Path) -> None:
    """OBJ=all names its arms by preset, OBJ=grid by head and weighting: the same training, so one
    trial directory, and a grid sweep after the default one trains only the arms it adds."""
    for preset, head, weighting in (("x0_simple", "x0", "own"), ("score_elbo", "score", "elbo")):
        by_preset = spec_of([f"experiment={preset}", f"run.root={tmp_path}"])
        by_pair = spec_of([f"head={head}", f"weighting={weighting}", f"run.root={tmp_path}"])
        assert by_preset.experiment != by_pair.experiment
        assert by_preset.resolved["objective"]["name"] != by_pair.resolved["objective"]["name"]
        assert trial_dir(by_preset) == trial_dir(by_pair)
