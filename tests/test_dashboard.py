"""The W&B dashboard is built, serialised and printed offline; saving is never reached without credentials."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from diffbench.cli.dashboard import build_workspace, main

SECTIONS = ["Verdict: likelihood and sample quality", "Training curves", "Samples"]
CURVES = ["train/loss", "val/loss", "val/vlb_bpd", "val/eps_mse"]
MEDIA = ["eval/samples", "eval/samples_ddim", "eval/x0_trajectory", "eval/vlb_terms"]
VERDICT = {
    "digits": ["final/nll_vlb_bpd", "final/nll_ode_bpd", "final/fd_digits"],
    "gmm": [
        "final/nll_vlb_bpd",
        "final/nll_ode_bpd",
        "final/nll_exact_bpd",
        "final/fd_digits",
        "final/eps_star_mse",
    ],
    "mnist": ["final/nll_vlb_bpd", "final/nll_ode_bpd", "final/fd_mnist"],
    "cifar10": ["final/nll_vlb_bpd", "final/nll_ode_bpd", "final/fid"],
}


def section_keys(workspace: ws.Workspace) -> dict[str, list[str]]:
    """Every key each section's panels read, in panel order."""
    keys: dict[str, list[str]] = {}
    for section in workspace.sections:
        keys[section.name] = []
        for panel in section.panels:
            if isinstance(panel, wr.BarPlot):
                keys[section.name] += panel.metrics
            elif isinstance(panel, wr.LinePlot):
                keys[section.name] += panel.y
            else:
                keys[section.name] += panel.media_keys
    return keys


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "missing-netrc"))


@pytest.fixture
def saving_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving is the only call that reaches W&B: a test that gets there fails instead of connecting."""
    monkeypatch.setattr(ws.Workspace, "save", lambda self: pytest.fail("tried to save to W&B"))


def test_digits_workspace_has_the_three_sections_and_their_keys() -> None:
    workspace = build_workspace("team", "diffbench", "comparison")
    assert (workspace.entity, workspace.project, workspace.name) == ("team", "diffbench", "comparison")
    assert [section.name for section in workspace.sections] == SECTIONS
    assert section_keys(workspace) == dict(zip(SECTIONS, [VERDICT["digits"], CURVES, MEDIA]))
    verdict, curves, samples = (section.panels for section in workspace.sections)
    assert all(isinstance(panel, wr.BarPlot) for panel in verdict)
    assert all(isinstance(panel, wr.LinePlot) for panel in curves)
    assert all(isinstance(panel, wr.MediaBrowser) for panel in samples)
    assert {panel.x for panel in curves} == {"trainer/global_step"}
    for panel in [*verdict, *curves]:
        assert panel.groupby == wr.Config("arm")
        assert (panel.groupby_aggfunc, panel.groupby_rangefunc) == ("mean", "stddev")


def test_runs_are_grouped_by_arm_and_filtered_to_the_dataset() -> None:
    runset = build_workspace("e", "p", "n", data="mnist").runset_settings
    # expr metrics overload == to build filters, so compare their keys, not the objects.
    assert [group.to_key().model_dump() for group in runset.groupby] == [{"section": "config", "name": "arm"}]
    assert "Tags" in runset.filters and "'mnist'" in runset.filters


@pytest.mark.parametrize("data", ["gmm", "mnist", "cifar10"])
def test_verdict_metrics_follow_the_dataset(data: str) -> None:
    keys = section_keys(build_workspace("e", "p", "n", data=data))
    assert keys[SECTIONS[0]] == VERDICT[data]
    assert keys[SECTIONS[1]] == CURVES and keys[SECTIONS[2]] == MEDIA


def test_unknown_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="digits, gmm, mnist, cifar10"):
        build_workspace("e", "p", "n", data="imagenet")


def test_serialises_to_the_spec_that_save_would_upload() -> None:
    view = build_workspace("e", "p", "n", data="gmm")._to_model()
    # upsert_view2 sends exactly this JSON as the view's spec.
    spec = json.loads(view.spec.model_dump_json(by_alias=True, exclude_none=True))
    sections = spec["section"]["panelBankConfig"]["sections"]
    assert [section["name"] for section in sections] == SECTIONS
    verdict, curves, samples = ([panel["config"] for panel in section["panels"]] for section in sections)
    assert [config["metrics"] for config in verdict] == [[key] for key in VERDICT["gmm"]]
    assert [config["metrics"] for config in curves] == [[key] for key in CURVES]
    assert [config["mediaKeys"] for config in samples] == [[key] for key in MEDIA]
    for config in [*verdict, *curves]:
        assert (config["groupBy"], config["groupAgg"], config["groupArea"]) == (
            "arm.value",
            "mean",
            "stddev",
        )
    assert {config["xAxis"] for config in curves} == {"trainer/global_step"}
    (runset,) = spec["section"]["runSets"]
    assert runset["grouping"] == [{"section": "config", "name": "arm.value"}]
    assert [(f["key"]["name"], f["op"], f["value"]) for f in runset["filters"]["filters"]] == [
        ("tags", "IN", ["gmm"])
    ]
    assert (view.entity, view.project, view.display_name) == ("e", "p", "n")


def test_spec_loads_back_into_the_same_workspace() -> None:
    """W&B's own loader reads the spec back and re-serialises it unchanged: nothing is lost in the format."""
    view = build_workspace("e", "p", "n", data="cifar10")._to_model()
    reloaded = ws.Workspace._from_model(view)._to_model()
    assert reloaded.model_dump(by_alias=True) == view.model_dump(by_alias=True)


@pytest.mark.usefixtures("no_credentials", "saving_forbidden")
def test_dry_run_prints_the_outline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--entity", "e", "--project", "p", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in [*SECTIONS, *VERDICT["digits"], *CURVES, *MEDIA, "e/p", "arm"]:
        assert line in out
    assert "final/fid" not in out


@pytest.mark.usefixtures("no_credentials", "saving_forbidden")
def test_without_credentials_it_says_how_to_log_in(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--entity", "e", "--project", "p"]) == 2
    captured = capsys.readouterr()
    assert "wandb login" in captured.err and "WANDB_API_KEY" in captured.err and "--dry-run" in captured.err
    assert captured.out == ""


@pytest.mark.usefixtures("no_credentials", "saving_forbidden")
def test_unknown_data_lists_the_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--entity", "e", "--project", "p", "--data", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "nonsense" in err
    assert all(name in err for name in ["digits", "gmm", "mnist", "cifar10"])


def test_with_credentials_it_saves_and_prints_the_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    saved: list[ws.Workspace] = []

    def save(self: ws.Workspace) -> SimpleNamespace:
        saved.append(self)
        return SimpleNamespace(url="https://wandb.example/e/p?nw=view")

    monkeypatch.setattr(ws.Workspace, "save", save)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert main(["--entity", "e", "--project", "p", "--data", "gmm", "--name", "gmm arms"]) == 0
    assert capsys.readouterr().out.strip() == "https://wandb.example/e/p?nw=view"
    (workspace,) = saved
    assert (workspace.entity, workspace.project, workspace.name) == ("e", "p", "gmm arms")
    assert "final/eps_star_mse" in section_keys(workspace)[SECTIONS[0]]
