"""Composition of the command line into a run config, and its error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffbench.config import ConfigError, available, compose
from diffbench.core.arms import Arm
from diffbench.spec import build_spec

EXPERIMENTS = available("experiment")
SIX_ARMS = {"eps_simple": ("eps", "own"), "eps_elbo": ("eps", "elbo"), "x0_simple": ("x0", "own")}
SIX_ARMS |= {"x0_elbo": ("x0", "elbo"), "score_simple": ("score", "own"), "score_elbo": ("score", "elbo")}


def test_six_arms_are_presets_with_their_exact_meaning() -> None:
    assert set(SIX_ARMS) <= set(EXPERIMENTS)
    for name, (head, weighting) in SIX_ARMS.items():
        cfg = compose([f"experiment={name}"])
        assert (cfg.objective.head, cfg.objective.weighting) == (head, weighting)
        assert Arm(head, weighting).label == name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_composes(name: str) -> None:
    cfg = compose([f"experiment={name}"])
    assert cfg.experiment == name
    assert cfg.data.name == "digits" and cfg.model.name == "unet_small"


def test_head_and_weighting_shortcuts_win_over_the_preset() -> None:
    cfg = compose(["experiment=eps_simple", "head=x0", "weighting=eps"])
    assert (cfg.objective.head, cfg.objective.weighting) == ("x0", "eps")
    assert compose(["objective=v"]).objective.head == "v"


def test_group_global_section_merges_at_top_level() -> None:
    cfg = compose(["trainer=gpu", "profile=full"])  # default and smoke set their own cadence
    assert cfg.speed.compile is True and cfg.run.checkpoint_every == 5000
    assert "_global_" not in cfg.trainer
    assert compose(["trainer=gpu", "speed.compile=false"]).speed.compile is False


def test_user_experiment_folders_come_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$DIFFBENCH_EXPERIMENTS, then ./experiments, then the built-in presets."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "eps_simple.yaml").write_text("objective:\n  weighting: minsnr\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "local_v.yaml").write_text("defaults:\n  objective: v\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFBENCH_EXPERIMENTS", str(tmp_path / "mine"))
    assert compose(["experiment=eps_simple"]).objective.weighting == "minsnr"
    assert compose(["experiment=local_v"]).objective.head == "v"
    assert compose(["experiment=x0_elbo"]).objective.head == "x0"
    assert {"eps_simple", "local_v", "x0_elbo"} <= set(available("experiment"))


def test_overrides_are_typed_and_groups_switch() -> None:
    cfg = compose(
        ["experiment=x0_elbo", "trainer.max_steps=500", "seed=3", "model=unet_ddpm_cifar", "optim.lr=2e-4"]
    )
    assert cfg.trainer.max_steps == 500 and isinstance(cfg.trainer.max_steps, int)
    assert cfg.seed == 3
    assert cfg.model.base_channels == 128 and list(cfg.model.channel_mult) == [1, 2, 2, 2]
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.objective.head == "x0"


def test_hydra_style_dashes_and_additions() -> None:
    cfg = compose(["--experiment=eps_simple", "+extra.note=hello"])
    assert cfg.extra.note == "hello"


def test_unknown_experiment_lists_the_real_ones() -> None:
    with pytest.raises(ConfigError) as error:
        compose(["experiment=eps_simpel"])
    for name in EXPERIMENTS:
        assert name in str(error.value)


def test_unknown_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        compose(["trainer.max_step=5"])


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("trainer.max_steps=abc", "expects a int"),
        ("optim.lr=fast", "expects a float"),
        ("trainer=[1]", "unknown"),
    ],
)
def test_wrong_type_is_explained(arg: str, expected: str) -> None:
    """Composing names an unknown group choice; the schema, as the spec is built, a wrong type."""
    with pytest.raises(ConfigError, match=expected):
        build_spec(compose([arg]))


def test_setting_a_whole_group_by_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="group of settings"):
        compose(["optim=3"])


def test_argument_without_equals_is_explained() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        compose(["eps_simple"])


def test_group_listing_matches_files() -> None:
    conf = Path(__file__).parents[1] / "src" / "diffbench" / "conf" / "model"
    assert available("model") == sorted(p.stem for p in conf.glob("*.yaml"))
