"""A longer budget is the shorter run continued: a trial whose only difference from a finished one
is a longer `trainer.max_steps` starts from that trial's last checkpoint (copied, the shorter
trial left as it was) and ends where training the longer budget from scratch ends, bit for bit on
CPU; a budget-dependent setting makes it start from scratch and say why."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY, spec_of
from diffbench.pipeline import plan_continuation, train
from diffbench.rundir import RUN_DIR_ENV, RunDir, shorter_trials, trial_dir
from test_resume import numbers

SHORT, LONG = 4, 8
ARGS = [
    *TINY,
    "eval.budget_base=4",  # budgets 4 (measured by the shorter run, carried over) and 8
    "eval.budget_samples=8",
    "eval.ode_images=0",
    "eval.also_samplers=[]",
    "eval.trajectory_images=0",
    "sample.num_images=0",
    "data.batch_size=16",
    "trainer.val_check_interval=4",
    "speed.threads=1",
    "run.reuse=true",
]
ARMS = {
    "eps_simple": ["head=eps", "weighting=own"],
    "eps_elbo": ["head=eps", "weighting=elbo"],
    "eps_elbo_is": ["head=eps", "weighting=elbo_is"],
    "x0_simple": ["head=x0", "weighting=own"],
}


def run(root: Path, arm: str, steps: int, *extra: str) -> dict:
    return train(spec_of([*ARGS, *ARMS[arm], *extra, f"run.root={root}", f"trainer.max_steps={steps}"]))


def contents(folder: Path) -> dict[str, str]:
    """Every file under a folder and the hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def weights(results: dict) -> dict[str, torch.Tensor]:
    path, step, _ = RunDir(results["run_dir"]).latest_checkpoint()
    assert step == LONG
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module", params=list(ARMS))
def trio(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One arm trained SHORT steps, then LONG steps beside it (continued), and LONG steps from
    scratch in another root; with the shorter trial's files before and after the continuation."""
    arm = request.param
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "disabled")  # no W&B service writing into the trials
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("DIFFBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        patch.delenv(RUN_DIR_ENV, raising=False)
        here, fresh = tmp_path_factory.mktemp(f"{arm}-continued"), tmp_path_factory.mktemp(f"{arm}-fresh")
        short = run(here, arm, SHORT)
        before = contents(Path(short["run_dir"]))
        continued = run(here, arm, LONG)
        after = contents(Path(short["run_dir"]))
        scratch = run(fresh, arm, LONG)
    return {"short": short, "continued": continued, "scratch": scratch, "before": before, "after": after}


@pytest.mark.slow
def test_a_longer_budget_continued_equals_it_trained_from_scratch(trio: dict) -> None:
    continued, scratch = trio["continued"], trio["scratch"]
    assert continued["continued_from"] == {"run_dir": trio["short"]["run_dir"], "step": SHORT}
    assert scratch["continued_from"] is None
    assert continued["config_hash"] == scratch["config_hash"] != trio["short"]["config_hash"]
    assert numbers(continued) == numbers(scratch)
    assert [row["step"] for row in continued["budgets"]] == [SHORT, LONG]
    ours, theirs = weights(continued), weights(scratch)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


@pytest.mark.slow
def test_the_shorter_trial_is_left_as_it_was(trio: dict) -> None:
    assert trio["after"] == trio["before"]
    assert numbers(RunDir(trio["short"]["run_dir"]).complete_results()) == numbers(trio["short"])


@pytest.mark.slow
def test_metrics_csv_of_the_continued_run_has_the_fresh_runs_values(trio: dict) -> None:
    """The same rows and values; only wall times and Lightning's epoch counter (the shorter run's
    epoch ended at its last step) may differ."""

    def rows(results: dict) -> list[dict[str, str]]:
        lines = (Path(results["run_dir"]) / "metrics.csv").read_text().splitlines()
        header = lines[0].split(",")
        ignored = {"epoch", "budget/wall_time_s"}
        return [{k: v for k, v in zip(header, line.split(",")) if k not in ignored} for line in lines[1:]]

    assert rows(trio["continued"]) == rows(trio["scratch"])


def fabricated_shorter(root: Path, *extra: str, budget: int = SHORT, **results: object) -> RunDir:
    """A finished shorter trial on disk without training it: its config and results.json."""
    spec = spec_of([*ARGS, *ARMS["eps_simple"], *extra, f"run.root={root}", f"trainer.max_steps={budget}"])
    run_dir = RunDir(trial_dir(spec))
    run_dir.path.mkdir(parents=True)
    run_dir.write_config(spec)
    record = {"status": "complete", "steps": budget, "budgets": [{"step": budget}], "config_hash": "x"}
    run_dir.write_results({**record, **results})
    return run_dir


def plan(root: Path, *extra: str, steps: int = LONG) -> tuple[object, str | None]:
    spec = spec_of([*ARGS, *ARMS["eps_simple"], *extra, f"run.root={root}", f"trainer.max_steps={steps}"])
    return plan_continuation(spec, [SHORT, steps])


def test_only_a_shorter_trial_differing_in_the_budget_alone_is_a_candidate(tmp_path: Path) -> None:
    fabricated_shorter(tmp_path, "optim.lr=3e-4")
    fabricated_shorter(tmp_path, "seed=1")
    fabricated_shorter(tmp_path, budget=16)
    assert plan(tmp_path) == (None, None)
    two, three = fabricated_shorter(tmp_path, budget=2), fabricated_shorter(tmp_path, budget=3)
    spec = spec_of([*ARGS, *ARMS["eps_simple"], f"run.root={tmp_path}", f"trainer.max_steps={LONG}"])
    assert [trial.run_dir.path for trial in shorter_trials(spec)] == [three.path, two.path]
    assert shorter_trials(spec_of([*ARGS, "run.reuse=false", f"run.root={tmp_path}"])) == []


@pytest.mark.parametrize(
    ("extra", "results", "why"),
    [
        (
            ["trainer.val_check_interval=6"],
            {},
            "it validated every 4 steps and this run validates every 6 (trainer.val_check_interval=6",
        ),
        ([], {"status": "diverged", "diverged_at_step": 3}, "it diverged at step 3, and so would this run"),
        ([], {"steps": 3}, "it stopped at step 3 of its 4"),
        ([], {"budgets": []}, "it has no per-budget row at step 4"),
        ([], {}, "it has no loadable checkpoint of its last step (4)"),
    ],
)
def test_a_budget_dependent_difference_says_why_it_starts_from_scratch(
    tmp_path: Path, extra: list[str], results: dict, why: str
) -> None:
    shorter = fabricated_shorter(tmp_path, *extra, **results)
    continuation, reason = plan(tmp_path, *extra)
    assert continuation is None
    assert reason is not None
    assert reason.startswith(f"not continuing from {shorter.path} ({SHORT} steps): {why}")
    assert reason.endswith("; training from scratch")


@pytest.mark.slow
def test_a_budget_dependent_setting_trains_from_scratch_and_prints_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shorter run validated at its end (every 4 steps: the interval 6 capped at its budget),
    the longer one validates every 6: its metrics would not be the fresh run's, so it starts over."""
    extra = ("trainer.val_check_interval=6",)
    short = run(tmp_path, "eps_simple", SHORT, *extra)
    capsys.readouterr()
    longer = run(tmp_path, "eps_simple", LONG, *extra)
    out = capsys.readouterr().out
    assert f"not continuing from {short['run_dir']} ({SHORT} steps): it validated every 4 steps" in out
    assert "continuing from" not in out.replace("not continuing from", "")
    assert longer["continued_from"] is None
    assert longer["steps"] == LONG


@pytest.mark.slow
def test_an_interrupted_continuation_resumes_and_still_says_where_it_came_from(
    tmp_path: Path, trio: dict
) -> None:
    """Cut short after its first own checkpoint, a continued run resumes from that checkpoint, not
    from the shorter trial again, and its results.json still names the trial it continued."""
    if trio["short"]["arm"] != "eps_simple":
        pytest.skip("one arm is enough")
    source = Path(trio["continued"]["run_dir"])
    copy = tmp_path / source.relative_to(Path(trio["short"]["run_dir"]).parents[3])
    shutil.copytree(
        source, copy, ignore=shutil.ignore_patterns("results.json", "last.ckpt", "step0000008.ckpt")
    )
    results = train(
        spec_of([*ARGS, *ARMS["eps_simple"], f"run.root={tmp_path}", f"trainer.max_steps={LONG}"])
    )
    assert Path(results["run_dir"]) == copy
    assert results["continued_from"] == trio["continued"]["continued_from"]
    assert numbers(results) == numbers(trio["scratch"])
    assert json.loads((copy / "results.json").read_text())["continued_from"]["step"] == SHORT
