"""`UNTIL=settled` as library code: after a round of the sweep, its headlines are worked out as the
report works them out (`analysis.report.compute_report`, whose `Settlement` gives every reason a
kind); while one is provisional for a reason more steps can remove, every trial's budget is doubled
and the plan runs again, each trial continuing its shorter finished self (`pipeline`'s
continuation), until all are settled, only reasons steps cannot remove are left, or the next
doubling would pass MAX_STEPS. Rounds already trained are found on disk, so the same command
resumes; the outcome is typed (`UntilResult`) and recorded beside the sweep's summary."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from diffbench import atomic, launch
from diffbench.analysis.collect import Incomplete, Run, by_group, load_run
from diffbench.analysis.report import compute_report
from diffbench.analysis.settled import Reason
from diffbench.analysis.verdicts import NO_VERDICT, Standing
from diffbench.config import ConfigError
from diffbench.launch import LaunchOptions, Outcome
from diffbench.plan import LR_OBJ, TUNED_OBJ, Check, Sweep, Trial, at_budget, trials_at
from diffbench.rundir import RunDir, trials_root

SETTLED = "settled"
GOALS = (SETTLED,)
DEFAULT_MAX_STEPS = 16_000
"""The full profile's budget: where the eps arms flatten on digits."""
RECORD_STEM = "until-settled"


class Stop(StrEnum):
    """Why the rounds ended (a launch that ended early, e.g. interrupted, has none)."""

    SETTLED = "every headline these arms test is settled"
    STEPS_CANNOT_HELP = "every reason left is one more steps cannot remove"
    MAX_STEPS = "the next doubling would pass MAX_STEPS"
    INCOMPLETE = "some trials of the round neither finished nor diverged"


def goal(until: str | None, max_steps: str | None, obj: str, options: LaunchOptions) -> int | None:
    """MAX_STEPS of an `UNTIL=settled` sweep (None without UNTIL), or ConfigError before anything
    is planned or trained."""
    if until is None:
        if max_steps is not None:
            raise ConfigError(
                f"MAX_STEPS={max_steps} only applies to UNTIL={SETTLED}, which doubles every trial's budget "
                f"up to it; add UNTIL={SETTLED}, or drop MAX_STEPS. Nothing was started."
            )
        return None
    if until not in GOALS:
        raise ConfigError(
            f"UNTIL={until} is not a goal the sweep knows: the one goal is UNTIL={SETTLED} (double every "
            "trial's training budget, continuing each trial, until every headline of the report is settled "
            "or MAX_STEPS is reached); drop UNTIL for a single round. Nothing was started."
        )
    if obj in (LR_OBJ, TUNED_OBJ):
        raise ConfigError(
            f"UNTIL={SETTLED} settles the claims of a sweep of arms, and OBJ={obj} is a check of the "
            f"optimiser across rates, whose choices belong to one budget; run UNTIL={SETTLED} on the sweep "
            f"itself (e.g. OBJ=all), then OBJ={obj} at the budget it settled at. Nothing was started."
        )
    text = str(DEFAULT_MAX_STEPS) if max_steps is None else max_steps.strip()
    steps = int(text) if text.isdecimal() else 0
    if steps < 1:
        raise ConfigError(
            f"MAX_STEPS={max_steps} is not a positive whole number of training steps: it is the largest "
            f"budget a round of UNTIL={SETTLED} may train (default {DEFAULT_MAX_STEPS}), e.g. "
            "MAX_STEPS=8000. Nothing was started."
        )
    if not options.here and not options.wait:
        raise ConfigError(
            f"UNTIL={SETTLED} with LAUNCHER=slurm needs WAIT=1: each round's results decide whether the "
            "next runs, so the sweep must wait for every array (it stays on the login node, best in tmux "
            "or screen). Nothing was submitted."
        )
    return steps


def first_budget(trials: list[Trial], max_steps: int) -> int:
    """The budget every trial of the first round trains, which the rounds double."""
    budgets = sorted({trial.spec.max_steps for trial in trials})
    if len(budgets) > 1:
        raise ConfigError(
            f"UNTIL={SETTLED} doubles one budget shared by every trial, and these trials train "
            f"{', '.join(map(str, budgets))} steps; set one with ARGS='trainer.max_steps=…'. "
            "Nothing was started."
        )
    if budgets[0] > max_steps:
        raise ConfigError(
            f"MAX_STEPS={max_steps} is below the sweep's budget of {budgets[0]} steps, so not even the first "
            f"round fits; raise MAX_STEPS to at least {budgets[0]} (each round doubles it: "
            f"{budgets[0]}, {2 * budgets[0]}, …). Nothing was started."
        )
    return budgets[0]


@dataclass(frozen=True)
class Headline:
    """One headline of a round: a claim of one group (None: a plumbing run's only line), settled
    or not, and the kind of every reason it is not. `first` (the group's first trial in plan order)
    names the group across rounds, whose names change with the budget."""

    first: int
    group: str
    claim: int | None
    text: str
    settled: bool
    reasons: tuple[Reason, ...]
    summary: str

    @property
    def key(self) -> tuple[int, int]:
        return self.first, self.claim or 0

    @property
    def name(self) -> str:
        return self.group if self.claim is None else f"{self.group} claim {self.claim}"

    @property
    def more_steps_help(self) -> bool:
        return not self.settled and any(reason.trainable for reason in self.reasons)

    def reasons_text(self) -> str:
        return "; ".join(
            f"{reason.value} ({'more steps help' if reason.trainable else 'more steps cannot help'})"
            for reason in self.reasons
        )


def headlines(trials: list[Trial]) -> list[Headline]:
    """The round's headlines from its own trials, as the report computes them: a group of a smoke
    profile states no verdict, which only a budget that is not plumbing can change."""
    loaded = [load_run(trial.directory) for trial in trials]
    index = {trial.directory.resolve(): i for i, trial in enumerate(trials)}
    runs = [item for item in loaded if isinstance(item, Run)]
    incomplete = [item for item in loaded if isinstance(item, Incomplete)]
    found = []
    for group, (group_runs, group_incomplete) in sorted(by_group(runs, incomplete).items()):
        if not group_runs:
            continue
        first = min(index.get(Path(run.directory).resolve(), len(trials)) for run in group_runs)
        report = compute_report(group, group_runs, group_incomplete)
        if report.plumbing:
            why = "the smoke profile is a plumbing check and states no verdict at any budget"
            found.append(Headline(first, group, None, NO_VERDICT, False, (Reason.NO_VERDICT,), why))
        for claim in report.claims:
            settlement = report.settlements[claim.number]
            summary = settlement.summary or "; ".join(kind.value for kind in settlement.kinds)
            found.append(
                Headline(
                    first, group, claim.number, claim.headline, settlement.settled, settlement.kinds, summary
                )
            )
    return found


def finished(trial: Trial) -> bool:
    """Complete, or stopped because it diverged: nothing is left to run."""
    return RunDir(trial.directory).final_results() is not None


@dataclass(frozen=True)
class Round:
    """One budget of the sweep: its trials, how many ran now (the rest were found on disk), how
    many are missing after the launch, and the headlines they give."""

    steps: int
    trials: list[Trial]
    ran: int
    missing: int
    headlines: list[Headline]

    def lines(self) -> list[str]:
        found = f", {len(self.trials) - self.ran} found finished" if self.ran < len(self.trials) else ""
        out = [f"[until] round at {self.steps} steps: {len(self.trials)} trials ({self.ran} run now{found})"]
        for line in self.headlines:
            status = Standing.SETTLED if line.settled else Standing.PROVISIONAL
            out.append(f"[until]   {line.name}: {line.text} [{status}]")
            if not line.settled:
                out.append(f"[until]     why: {line.summary}")
                out.append(f"[until]     reasons: {line.reasons_text()}")
        return out


def decide(done: Round, max_steps: int) -> Stop | None:
    """Whether to stop after this round, and why; None: double and run again."""
    if done.missing:
        return Stop.INCOMPLETE
    tested = [line for line in done.headlines if Reason.UNTESTED not in line.reasons]
    if tested and all(line.settled for line in tested):
        return Stop.SETTLED
    if not any(line.more_steps_help for line in done.headlines):
        return Stop.STEPS_CANNOT_HELP
    if 2 * done.steps > max_steps:
        return Stop.MAX_STEPS
    return None


@dataclass(frozen=True)
class Estimate:
    """What the next round runs and about how long it takes, from the step time just measured:
    each trial trains only the steps past its shorter self, then is evaluated again."""

    trials: int
    start: int
    end: int
    step_s: float | None
    eval_s: float
    at_once: int

    @property
    def seconds(self) -> float | None:
        if self.step_s is None:
            return None
        per_trial = (self.end - self.start) * self.step_s + self.eval_s
        return math.ceil(self.trials / self.at_once) * per_trial

    @property
    def text(self) -> str:
        head = f"[until] next: {self.trials} trials from {self.start} to {self.end} steps (each continued)"
        if self.seconds is None:
            return f"{head}; no step time measured yet, so no estimate"
        return (
            f"{head}, about {self.seconds / 60:.1f} min: {1000 * self.step_s:.1f} ms per step measured "
            f"at {self.start} steps × {self.end - self.start} steps + {self.eval_s:.0f} s evaluation per "
            f"trial, {self.at_once} at once"
        )


def measured_times(trials: list[Trial]) -> tuple[float | None, float]:
    """Mean training seconds per step (over the steps each trial trained itself, past the trial it
    continued) and mean evaluation seconds per trial, from the trials' results.json."""
    per_step, evaluation = [], []
    for trial in trials:
        results = RunDir(trial.directory).final_results() or {}
        trained = (results.get("steps") or 0) - ((results.get("continued_from") or {}).get("step") or 0)
        if trained > 0 and results.get("train_wall_time_s"):
            per_step.append(results["train_wall_time_s"] / trained)
        if results.get("eval_wall_time_s"):
            evaluation.append(results["eval_wall_time_s"])
    mean = sum(per_step) / len(per_step) if per_step else None
    return mean, sum(evaluation) / len(evaluation) if evaluation else 0.0


def at_once(options: LaunchOptions, count: int) -> int:
    if options.here:
        return max(1, len(options.slots()))
    return options.array_parallelism or max(1, count)


@dataclass(frozen=True)
class UntilResult:
    """Where the rounds ended: every round measured, the last launch's outcome (its code set when
    it ended early, e.g. interrupted, and then `stop` is None), the trials of the last round
    started, and the record's path stem."""

    rounds: list[Round]
    outcome: Outcome
    stop: Stop | None
    max_steps: int
    trials: list[Trial]
    record: Path

    def settled_at(self, key: tuple[int, int]) -> int | None:
        """The smallest budget from which the headline was settled in every later round."""
        at = None
        for done in reversed(self.rounds):
            line = next((h for h in done.headlines if h.key == key), None)
            if line is None or not line.settled:
                break
            at = done.steps
        return at

    def payload(self) -> dict:
        last = self.rounds[-1] if self.rounds else None
        stopped = self.stop_text()
        lines = []
        for line in last.headlines if last else []:
            rounds = [
                {
                    "steps": done.steps,
                    "settled": h.settled,
                    "reasons": [r.name for r in h.reasons],
                    "summary": h.summary,
                }
                for done in self.rounds
                for h in done.headlines
                if h.key == line.key
            ]
            settled_at = self.settled_at(line.key)
            lines.append(
                {
                    "group": line.group,
                    "claim": line.claim,
                    "headline": line.text,
                    "settled_at": settled_at,
                    "why_not": None if settled_at is not None else line.summary,
                    "reasons": [r.name for r in line.reasons],
                    "more_steps_help": line.more_steps_help,
                    "rounds": rounds,
                }
            )
        return {
            "goal": SETTLED,
            "max_steps": self.max_steps,
            "budgets": [done.steps for done in self.rounds],
            "stop": self.stop.name if self.stop else None,
            "stopped": stopped,
            "headlines": lines,
        }

    def stop_text(self) -> str:
        if self.stop is None:
            return "the rounds did not end: a launch stopped early (run the same command again to resume)"
        if self.stop == Stop.MAX_STEPS and self.rounds:
            steps = 2 * self.rounds[-1].steps
            return f"{self.stop.value} ({steps} steps > MAX_STEPS={self.max_steps})"
        return self.stop.value

    def markdown(self) -> str:
        payload = self.payload()
        budgets = ", ".join(map(str, payload["budgets"])) or "none"
        out = [
            f"# UNTIL={SETTLED}",
            "",
            f"Budgets trained: {budgets} steps (MAX_STEPS={self.max_steps}). Stopped: {payload['stopped']}.",
            "",
            "| headline | settled at | why not |",
            "|---|---|---|",
        ]
        last = self.rounds[-1].headlines if self.rounds else []
        for line, item in zip(last, payload["headlines"], strict=True):
            at = "—" if item["settled_at"] is None else f"{item['settled_at']} steps"
            why = "" if item["settled_at"] is not None else f"{line.summary} — {line.reasons_text()}"
            out.append(f"| {line.name}: {line.text} | {at} | {why} |")
        return "\n".join(out) + "\n"

    def write(self) -> None:
        atomic.write_text(self.record.with_suffix(".json"), json.dumps(self.payload(), indent=2) + "\n")
        atomic.write_text(self.record.with_suffix(".md"), self.markdown())


def record_stem(sweep: Sweep, trials: list[Trial]) -> Path:
    """`<trials root>/until-settled-<sweep>`, beside the sweep's summary."""
    return trials_root(trials[0].directory) / f"{RECORD_STEM}-{sweep.name}"


def run(
    sweep: Sweep,
    trials: list[Trial],
    options: LaunchOptions,
    check: Check,
    max_steps: int,
    say: Callable[[str], None] = print,
) -> UntilResult:
    """Rounds of the plan at doubling budgets, from the trials' own budget, each running only the
    trials not finished on disk; the record is rewritten after every round."""
    steps = first_budget(trials, max_steps)
    stem = record_stem(sweep, trials)
    rounds: list[Round] = []
    current, current_sweep = trials, sweep
    while True:
        todo = [trial for trial in current if not finished(trial)]
        if todo:
            outcome = launch.run(todo, options, current_sweep.name, current_sweep.config())
            if outcome.code is not None:
                return UntilResult(rounds, outcome, None, max_steps, current, stem)
        missing = sum(not finished(trial) for trial in current)
        done = Round(steps, current, len(todo), missing, headlines(current))
        rounds.append(done)
        stop = decide(done, max_steps)
        result = UntilResult(rounds, Outcome(), stop, max_steps, current, stem)
        result.write()
        for line in done.lines():
            say(line)
        if stop is not None:
            say(f"[until] stop: {result.stop_text()}")
            return result
        current_sweep = at_budget(sweep, 2 * steps)
        current = trials_at(current_sweep, [trial.point for trial in trials], check, options.here)
        pending = [trial for trial in current if not finished(trial)]
        step_s, eval_s = measured_times(done.trials)
        say(Estimate(len(pending), steps, 2 * steps, step_s, eval_s, at_once(options, len(pending))).text)
        steps *= 2
