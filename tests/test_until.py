"""UNTIL=settled: the round loop over a faked launcher that writes fabricated results (when it
stops, that each round doubles every trial's budget, that an interrupted sweep resumes), the bad
input it refuses, and one real smoke sweep through the command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import TINY
from diffbench import launch, until
from diffbench.analysis.settled import Reason, Settlement
from diffbench.cli.sweep import main, run_check
from diffbench.core.arms import Arm
from diffbench.launch import LaunchOptions, Outcome
from diffbench.plan import SweepOptions, Trial, configure, plan
from diffbench.rundir import RunDir
from diffbench.until import Stop

Value = Callable[[Arm, int, int], float]
"""The fabricated NLL of an arm and seed at a step (every budget row and the final metric)."""
BASE = 1000
NOISE = {0: 0.0, 1: 0.012, 2: -0.009}


def elbo_wins(moving_until: int) -> Value:
    """eps_elbo about 0.3 bpd below eps_simple on every seed (a difference that holds); every
    curve drops by a sixth per doubling up to `moving_until` steps and is flat from there on."""

    def value(arm: Arm, seed: int, step: int) -> float:
        level, noise = (1.0, 2 * NOISE[seed]) if arm.weighting == "elbo" else (1.3, NOISE[seed])
        return level * 1.2 ** max(0.0, math.log2(moving_until / step)) + noise

    return value


def budget_steps(steps: int) -> list[int]:
    """250 · 2^k below the budget, and the budget, as training measures them."""
    found, step = [], 250
    while step < steps:
        found.append(step)
        step *= 2
    return [*found, steps]


def write_trial(trial: Trial, value: Value, final: Value | None = None) -> None:
    """What a finished trial leaves: its config and a complete results.json (continued from its
    half-budget self past the first round), 1 ms per step, 2 s of evaluation."""
    spec = trial.spec
    steps, arm, seed = spec.max_steps, spec.arm, spec.seed
    run_dir = RunDir(trial.directory)
    trial.directory.mkdir(parents=True, exist_ok=True)
    run_dir.write_config(spec)
    continued = {"run_dir": "elsewhere", "step": steps // 2} if steps > BASE else None
    trained = steps - (steps // 2 if continued else 0)
    run_dir.write_results(
        {
            "status": "complete",
            "experiment": spec.experiment,
            "arm": arm.label,
            "head": arm.head,
            "weighting": arm.weighting,
            "seed": seed,
            "profile": spec.profile,
            "data": spec.data.name,
            "steps": steps,
            "metrics": {"nll_vlb_bpd": (final or value)(arm, seed, steps)},
            "budgets": [{"step": s, "val_vlb_bpd": value(arm, seed, s)} for s in budget_steps(steps)],
            "train_wall_time_s": 0.001 * trained,
            "eval_wall_time_s": 2.0,
            "continued_from": continued,
        }
    )


class FakeLauncher:
    """launch.run that writes every trial it is given (or, with `stop_after`, that many, then
    stops as a Ctrl-C would) and records the budgets it was asked to run."""

    def __init__(self, value: Value, final: Value | None = None, stop_after: int | None = None) -> None:
        self.value, self.final, self.stop_after = value, final, stop_after
        self.calls: list[list[Trial]] = []

    def __call__(
        self, trials: list[Trial], options: LaunchOptions, name: str, config: dict | None
    ) -> Outcome:
        self.calls.append(trials)
        for index, trial in enumerate(trials):
            if self.stop_after is not None and index >= self.stop_after:
                return Outcome(130)
            write_trial(trial, self.value, self.final)
        return Outcome()

    @property
    def budgets(self) -> list[set[int]]:
        return [{t.spec.max_steps for t in call} for call in self.calls]


@pytest.fixture
def trials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[until.Sweep, list[Trial]]:
    """OBJ=eps on seeds 0–2 at 1,000 steps, planned under tmp_path/runs."""
    monkeypatch.chdir(tmp_path)
    options = SweepOptions("eps", args=f"trainer.max_steps={BASE} run.root={tmp_path / 'runs'}")
    sweep = configure(options)
    return sweep, plan(sweep, options, run_check)


def rounds(
    setup: tuple[until.Sweep, list[Trial]],
    launcher: FakeLauncher,
    monkeypatch: pytest.MonkeyPatch,
    max_steps: int = 16_000,
    lines: list[str] | None = None,
) -> until.UntilResult:
    """The rounds with this launcher, two trials at once; what they say goes to `lines`."""
    monkeypatch.setattr(launch, "run", launcher)
    sweep, planned = setup
    say = (lines if lines is not None else []).append
    return until.run(sweep, planned, LaunchOptions(jobs=2), run_check, max_steps, say)


def claim1(result: until.UntilResult, index: int = -1) -> until.Headline:
    return next(h for h in result.rounds[index].headlines if h.claim == 1)


def test_reason_kinds_say_whether_more_steps_help() -> None:
    assert {r for r in Reason if r.trainable} == {
        Reason.FEW_BUDGETS,
        Reason.VERDICT_CHANGED,
        Reason.MOVING,
        Reason.HEADING_FOR_ZERO,
        Reason.NO_VERDICT,
    }
    untested = Settlement(None)
    assert untested.kinds == (Reason.UNTESTED,) and not untested.more_steps_help


def test_stops_when_settled_and_each_round_doubles_every_budget(
    trials: tuple[until.Sweep, list[Trial]], monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher, lines = FakeLauncher(elbo_wins(moving_until=2000)), []
    result = rounds(trials, launcher, monkeypatch, lines=lines)
    assert result.stop == Stop.SETTLED and result.outcome.code is None
    assert [r.steps for r in result.rounds] == [1000, 2000, 4000]
    assert launcher.budgets == [{1000}, {2000}, {4000}]
    for before, after in zip(launcher.calls, launcher.calls[1:]):
        assert [t.point for t in after] == [t.point for t in before] and len(after) == 6
        assert {t.directory for t in after}.isdisjoint(t.directory for t in before)
    first = claim1(result, 0)
    assert claim1(result).text.startswith("holds")
    assert not first.settled and Reason.MOVING in first.reasons and first.more_steps_help
    last = result.rounds[-1].headlines
    untested = [h for h in last if h.reasons == (Reason.UNTESTED,)]
    assert claim1(result).settled and all(h.settled for h in last if h not in untested)
    assert untested and not any(h.more_steps_help for h in untested), "the one head tests no head claim"
    assert result.settled_at(first.key) == 4000, "flat from 2000 steps: two flat budgets at 4000"
    record = json.loads(result.record.with_suffix(".json").read_text())
    assert record["budgets"] == [1000, 2000, 4000] and record["stop"] == "SETTLED"
    assert [h["settled_at"] for h in record["headlines"] if h["claim"] == 1] == [4000]
    assert all(h["why_not"] for h in record["headlines"] if h["reasons"] == ["UNTESTED"])
    assert "| 4000 steps |" in result.record.with_suffix(".md").read_text()
    text = "\n".join(lines)
    assert "next: 6 trials from 1000 to 2000 steps" in text and "1.0 ms per step" in text
    assert "about 0.1 min" in text, "3 waves of 2 × (1000 steps × 1 ms + 2 s)"
    assert "an arm still moving (more steps help)" in text


def test_stops_when_only_reasons_more_steps_cannot_remove_are_left(
    trials: tuple[until.Sweep, list[Trial]], monkeypatch: pytest.MonkeyPatch
) -> None:
    flat = elbo_wins(moving_until=1)

    def final(arm: Arm, seed: int, step: int) -> float:  # the final evaluation sees no difference
        return 1.15 + NOISE[seed] + (0.001 if arm.weighting == "elbo" else 0.0) * seed

    result = rounds(trials, FakeLauncher(flat, final), monkeypatch)
    assert result.stop == Stop.STEPS_CANNOT_HELP and [r.steps for r in result.rounds] == [1000]
    line = claim1(result)
    assert line.reasons == (Reason.FINAL_DIFFERS,) and not line.more_steps_help
    assert json.loads(result.record.with_suffix(".json").read_text())["headlines"][0]["settled_at"] is None


def test_stops_before_a_doubling_past_max_steps(
    trials: tuple[until.Sweep, list[Trial]], monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher = FakeLauncher(elbo_wins(moving_until=10**9))
    result = rounds(trials, launcher, monkeypatch, max_steps=5000)
    assert result.stop == Stop.MAX_STEPS and [r.steps for r in result.rounds] == [1000, 2000, 4000]
    assert launcher.budgets == [{1000}, {2000}, {4000}]
    assert "8000 steps > MAX_STEPS=5000" in result.record.with_suffix(".md").read_text()
    assert claim1(result).more_steps_help


def test_an_interrupted_sweep_resumes_where_it_stopped(
    trials: tuple[until.Sweep, list[Trial]], monkeypatch: pytest.MonkeyPatch
) -> None:
    value = elbo_wins(moving_until=2000)
    first = FakeLauncher(value)
    first_round = rounds(trials, first, monkeypatch, max_steps=1000)  # one round, stopped at MAX_STEPS
    assert first_round.stop == Stop.MAX_STEPS
    interrupted = FakeLauncher(value, stop_after=4)
    stopped = rounds(trials, interrupted, monkeypatch)
    assert stopped.stop is None and stopped.outcome.code == 130
    assert interrupted.budgets == [{2000}], "the finished round is found on disk, not run again"
    resumed = FakeLauncher(value)
    result = rounds(trials, resumed, monkeypatch)
    assert [len(call) for call in resumed.calls] == [2, 6], "the two trials left at 2000, then 4000"
    assert resumed.budgets == [{2000}, {4000}]
    assert result.stop == Stop.SETTLED and [r.steps for r in result.rounds] == [1000, 2000, 4000]
    assert [r.ran for r in result.rounds] == [0, 2, 6]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--until", "foo"], "UNTIL=foo is not a goal"),
        (["--until", "settled", "--max-steps", "0"], "MAX_STEPS=0 is not a positive whole number"),
        (["--until", "settled", "--max-steps", "1e4"], "MAX_STEPS=1e4 is not a positive whole number"),
        (["--obj", "lr", "--until", "settled"], "OBJ=lr is a check of the optimiser"),
        (["--max-steps", "500"], "MAX_STEPS=500 only applies to UNTIL=settled"),
        (["--until", "settled", "--launcher", "slurm"], "needs WAIT=1"),
        (["--obj", "eps", "--until", "settled", "--max-steps", "500"], "below the sweep's budget of 1000"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(
    args: list[str], words: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object) -> Outcome:
        raise AssertionError("nothing may be launched")

    monkeypatch.setattr(launch, "run", never)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "Nothing was" in err and err.count("\n") == 1


@pytest.mark.slow
def test_smoke_sweep_until_settled_runs_every_round_and_says_why(tmp_path: Path) -> None:
    """A plumbing run states no verdict, so every round runs: 4, 8 and 16 steps, each continued."""
    args = " ".join([*TINY[1:], "trainer.max_steps=4"])
    command = [sys.executable, "-m", "diffbench.sweep", "--obj", "eps", "--profile", "smoke", "--seeds", "1"]
    command += ["--until", "settled", "--max-steps", "16", "--args", args]
    env = {**os.environ, "WANDB_MODE": "offline"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "runs" / "trials" / "smoke-digits"
    for arm in ("eps_simple", "eps_elbo"):
        results = [json.loads(p.read_text()) for p in (root / arm).glob("s0-*/results.json")]
        by_steps = {r["steps"]: r for r in results}
        assert sorted(by_steps) == [4, 8, 16]
        assert by_steps[4]["continued_from"] is None
        assert by_steps[8]["continued_from"]["step"] == 4 and by_steps[16]["continued_from"]["step"] == 8
    record = json.loads((root / "until-settled-diffbench-eps.json").read_text())
    assert record["budgets"] == [4, 8, 16] and record["stop"] == "MAX_STEPS"
    assert record["headlines"] and all(
        h["settled_at"] is None and h["reasons"] == ["NO_VERDICT"] for h in record["headlines"]
    )
    assert "next: 2 trials from 4 to 8 steps" in done.stdout and "next: 2 trials from 8 to 16" in done.stdout
    assert "32 steps > MAX_STEPS=16" in done.stdout
