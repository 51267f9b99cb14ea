"""W&B carries the budgets: a report read from a W&B project (`python -m diffbench.report --wandb`)
is the report read from the run directories, per-budget tables and settled status included. The
W&B side holds what `pipeline.log_to_wandb` logs for each run, captured by a stand-in logger,
stored as W&B's service stores it (JSON, NaN as null, a float like 4.0 read back as 4) and read
through W&B's own public-API summary class; no network is touched."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import wandb
from wandb.apis.public.summary import HTTPSummary

from diffbench.analysis.collect import from_wandb, scan
from diffbench.cli import report as report_cli
from diffbench.core.arms import Arm
from diffbench.pipeline import log_to_wandb
from diffbench.rundir import DIVERGED, RunDir
from diffbench.tracking import summary_results, wandb_summary
from fabricate import write_config, write_run

PROJECT = "team/diffbench"
SEEDS = (0, 1, 2)
ARMS = tuple(Arm.parse(label) for label in ("eps_simple", "eps_elbo", "x0_simple", "x0_elbo"))


class Experiment:
    """A W&B run as `log_to_wandb` uses it: the summary it is updated with is kept."""

    def __init__(self) -> None:
        self.summary: dict = {}

    def define_metric(self, name: str, summary: str | None = None) -> None:
        pass

    def log(self, data: dict) -> None:
        pass


class Logger:
    """A WandbLogger stand-in for `log_to_wandb`."""

    def __init__(self) -> None:
        self.experiment = Experiment()

    def log_image(self, key: str, images: list[str], step: int) -> None:
        pass


def stored(value: object) -> object:
    """`value` as W&B's service hands it back: JSON, with non-finite numbers as null and floats
    with an integral value as integers."""
    if isinstance(value, dict):
        return {key: stored(item) for key, item in value.items()}
    if isinstance(value, list):
        return [stored(item) for item in value]
    if isinstance(value, float):
        return None if not math.isfinite(value) else int(value) if value.is_integer() else value
    return value


def remote(directory: Path, number: int, tmp: Path) -> SimpleNamespace:
    """The W&B run a run directory's training would have made: its config as logged (with `arm`)
    and the summary `log_to_wandb` (or, for a diverged run, `record_divergence`) logs."""
    run_dir = RunDir(directory)
    results = run_dir.final_results()
    assert results is not None
    if results["status"] == DIVERGED:
        summary = wandb_summary(results)
    else:
        logger = Logger()
        log_to_wandb(logger, results, run_dir, results["steps"])  # type: ignore[arg-type]
        summary = logger.experiment.summary
    config = run_dir.read_config() or {}
    encoded = json.loads(json.dumps(stored(summary)))
    return SimpleNamespace(
        id=f"r{number}",
        state="finished",
        created_at=f"2026-01-01T00:00:{number:02d}Z",
        config={**config, "arm": results["arm"]},
        summary=HTTPSummary(SimpleNamespace(dir=str(tmp)), None, summary=encoded),
    )


def rows(arm: Arm, index: int) -> list[dict]:
    """eps: the ELBO arm ahead by 0.3 + 0.05 k bpd at both budgets, every curve flat (settled);
    x0: the ELBO arm behind at 50 steps, ahead at 100 (a verdict that turned: provisional). A row
    without a step is passed over by both readers."""
    elbo = arm.weighting == "elbo"
    final = 4.0 + 0.1 * index - (0.3 + 0.05 * index if elbo else 0.0)
    early = final + 0.05 + (0.8 if elbo and arm.head == "x0" else 0.0)
    return [
        {"step": 50, "val_vlb_bpd": early, "val_eps_mse": 0.5 + 0.01 * index, "wall_time_s": 1.0},
        {
            "step": 100,
            "val_vlb_bpd": final,
            "val_eps_mse": 0.25,
            "fd_digits": float("nan"),
            "wall_time_s": 2.0,
        },
        {"val_vlb_bpd": 9.0},
    ]


def fabricate(root: Path) -> None:
    """Four arms x three seeds with per-budget rows, evaluation settings and optimisation records,
    a diverged run and an unfinished one."""
    for arm in ARMS:
        for index, seed in enumerate(SEEDS):
            budget = rows(arm, index)
            metrics = {"nll_vlb_bpd": budget[1]["val_vlb_bpd"] + 0.01, "nll_ode_bpd": float("nan")}
            extra = {
                "num_params": 1234,
                "optimisation": {"gradient_clip_val": None, "clipped_fraction": 0.0, "grad_norm_median": 1.5},
                "evaluation": {
                    "nll_vlb_settings": {"timesteps": "stratified-2", "num_images": 359, "wall_time_s": 1.25},
                    "sample_settings": {"sampler": "ddim", "steps": 50, "num_samples": 1000},
                    "baselines": {"histogram_nll_bpd": 2.4 + 0.01 * seed},
                },
            }
            write_run(root, arm, seed, metrics, budget, extra=extra)
    diverged = root / "trials" / "default-digits" / "x0_simple" / "s3"
    write_config(diverged, Arm("x0", "own"), 3)
    RunDir(diverged).write_results(
        {
            "status": DIVERGED,
            "arm": "x0_simple",
            "seed": 3,
            "steps": 40,
            "diverged_at_step": 40,
            "metrics": {},
        }
    )


class Api:
    """`wandb.Api()` over the W&B runs of every run directory under `root` that has results."""

    def __init__(self, root: Path) -> None:
        directories = sorted(path.parent for path in root.rglob("results.json") if "report" not in path.parts)
        self.remotes = [remote(directory, n, root) for n, directory in enumerate(directories)]

    def runs(self, path: str) -> list[SimpleNamespace]:
        assert path == PROJECT
        return self.remotes


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    fabricate(root)
    api = Api(root)
    monkeypatch.setattr(wandb, "Api", lambda: api)
    return root


def test_the_wandb_reader_gives_the_run_directory_readers_runs(runs: Path) -> None:
    """Same runs, same per-budget rows (the stepless row passed over), evaluation, optimisation
    and steps; the diverged run is listed as diverged by both."""
    local, local_incomplete = scan(runs)
    remote_runs, remote_incomplete = from_wandb(PROJECT)
    key = lambda run: (run.arm.label, run.seed)  # noqa: E731
    assert len(local) == len(remote_runs) == len(ARMS) * len(SEEDS)
    for here, there in zip(sorted(local, key=key), sorted(remote_runs, key=key), strict=True):
        assert (here.arm, here.seed, here.group, here.steps) == (
            there.arm,
            there.seed,
            there.group,
            there.steps,
        )
        assert here.metrics == there.metrics and here.dropped == there.dropped == ["nll_ode_bpd"]
        assert [row["step"] for row in there.budgets] == [50, 100]
        assert {k: v for k, v in here.budgets[0].items()} == pytest.approx(there.budgets[0])
        assert here.budgets[1]["fd_digits"] is None is there.budgets[1]["fd_digits"]
        assert here.evaluation == there.evaluation and here.optimisation == there.optimisation
    ((diverged_here,), (diverged_there,)) = (
        [i for i in incomplete if i.diverged] for incomplete in (local_incomplete, remote_incomplete)
    )
    assert (
        diverged_here.reason
        == diverged_there.reason
        == ("diverged at step 40 (non-finite training loss): no metrics")
    )
    assert (diverged_there.diverged_at, diverged_there.label, diverged_there.seed) == (40, "x0_simple", 3)


def test_a_report_from_wandb_is_the_report_from_the_run_directories(runs: Path, tmp_path: Path) -> None:
    """Claims, settled status, per-budget tables and every other section agree, in report.json and
    report.md; only where a run is (a directory or a W&B run) differs."""
    assert report_cli.main(["--runs", str(runs), "--out", str(tmp_path / "disk"), "--no-figures"]) == 0
    assert report_cli.main(["--wandb", PROJECT, "--out", str(tmp_path / "wandb"), "--no-figures"]) == 0
    (disk,) = (tmp_path / "disk").glob("*/report.json")
    (remote_report,) = (tmp_path / "wandb").glob("*/report.json")
    assert disk.parent.name == remote_report.parent.name
    here, there = json.loads(disk.read_text()), json.loads(remote_report.read_text())
    status = {claim["number"]: claim["status"] for claim in there["claims"]}
    assert status[1]["settled"] and status[1]["verdicts"] == {"50": "holds", "100": "holds"}
    assert not status[4]["settled"] and status[4]["verdicts"] == {"50": "contradicted", "100": "holds"}
    assert without_locations(here) == without_locations(there)
    markdown = [
        [LOCATION.sub("- ", line) for line in (path.parent / "report.md").read_text().splitlines()]
        for path in (disk, remote_report)
    ]
    assert markdown[0] == markdown[1]
    assert "## Along the training budget" in markdown[1]
    assert "| x0_elbo | 4.6 | 3.75 | moving (18.5% per doubling) |" in markdown[1]
    assert "| claim 4 | contradicted | holds | holds | provisional |" in markdown[1]


LOCATION = re.compile(r"^- `[^`]*` ")
"""Where an incomplete run is, at the head of its line in report.md."""


def without_locations(report: dict) -> dict:
    """The report with where each incomplete run is (a path or a W&B run) left out."""
    return {
        **report,
        "incomplete": [{k: v for k, v in item.items() if k != "directory"} for item in report["incomplete"]],
    }


@pytest.mark.slow  # starts wandb's service for one offline run
def test_the_wandb_sdk_stores_what_the_report_reads(tmp_path: Path) -> None:
    """Through the real SDK (an offline run): the summary records `log_to_wandb` publishes, decoded
    as W&B's server would store them, read back as the results.json they came from."""
    from lightning.pytorch.loggers import WandbLogger

    directory = write_run(
        tmp_path,
        Arm("eps", "elbo"),
        0,
        {"nll_vlb_bpd": 3.5, "nll_ode_bpd": float("nan")},
        rows(Arm("eps", "elbo"), 1),
        extra={"num_params": 7, "evaluation": {"sample_settings": {"sampler": "ddim"}}, "optimisation": {}},
    )
    results = RunDir(directory).final_results()
    assert results is not None
    logger = WandbLogger(save_dir=str(tmp_path), mode="offline", project="p")
    run = logger.experiment
    published: dict = {}
    publish = run._interface._publish_summary

    def keep(record: object) -> None:
        for item in record.update:  # type: ignore[attr-defined]
            *path, last = list(item.nested_key) or [item.key]
            node = published
            for key in path:
                node = node.setdefault(key, {})
            node[last] = json.loads(item.value_json)
        publish(record)

    run._interface._publish_summary = keep
    log_to_wandb(logger, results, RunDir(directory), results["steps"])
    run.finish()
    read = summary_results(HTTPSummary(SimpleNamespace(dir=str(tmp_path)), None, summary=published))
    assert read["budgets"] == [
        {**row, "fd_digits": None} if "fd_digits" in row else row for row in results["budgets"]
    ]
    assert read["metrics"] == {"nll_vlb_bpd": 3.5, "nll_ode_bpd": None}
    assert {k: read[k] for k in ("status", "seed", "steps", "evaluation")} == {
        k: results[k] for k in ("status", "seed", "steps", "evaluation")
    }
