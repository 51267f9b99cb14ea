"""Optimiser fairness: each arm's learning rate chosen on a tuning seed by a validation metric at
the final budget, one rate per claim family (likelihood: the validation VLB; samples: the
validation-reference feature distance), so no arm is judged at a step size tuned for another."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from diffbench.analysis.collect import Incomplete, Run
from diffbench.core.arms import Arm
from diffbench.rundir import QUALITY_METRICS, RunDir

LIKELIHOOD, SAMPLES = "likelihood", "samples"
FAMILIES = (LIKELIHOOD, SAMPLES)
FAMILY_METRICS = {LIKELIHOOD: ("val_vlb_bpd",), SAMPLES: QUALITY_METRICS}
"""The validation metric of each family, first one present wins (the feature distance of the
dataset's own classifier, or FID on CIFAR-10)."""
CLAIM_FAMILIES = {1: (LIKELIHOOD,), 2: (SAMPLES,), 3: FAMILIES, 4: FAMILIES}
"""Which tuned rates a claim is read at: claim 1 compares likelihoods, claim 2 samples, claims 3
and 4 both (each at the rates tuned for that family)."""
TUNING_ONLY = {"eval.enabled": False, "eval.reference_split": "val"}
"""What a tuning trial changes besides its seed and rate: no final evaluation (the test split is
never looked at), and the per-budget feature distance measured against validation images."""


@dataclass(frozen=True)
class TuningTrial:
    """One arm at one rate on the tuning seed: its last budget row, or why it has none."""

    arm: Arm
    rate: float
    final: dict[str, float]
    step: int | None = None
    note: str = ""
    optimisation: dict = field(default_factory=dict)
    seed: int | None = None


@dataclass(frozen=True)
class Choice:
    """The rate an arm gets for one family, the metric that chose it and every rate's value
    (None: diverged or not measured, never a candidate)."""

    arm: Arm
    family: str
    metric: str | None
    rate: float | None
    values: dict[float, float | None]

    @property
    def edge(self) -> str | None:
        """ "lowest"/"highest" when the chosen rate is an end of the grid: the best rate may lie
        beyond it, and the grid should be widened before the choice is trusted."""
        if self.rate is None or len(self.values) < 2:
            return None
        return (
            "lowest"
            if self.rate == min(self.values)
            else "highest"
            if self.rate == max(self.values)
            else None
        )


def family_metric(trials: list[TuningTrial], family: str) -> str | None:
    """The family's validation metric that the tuning trials measured, if any."""
    found = {key for trial in trials for key in trial.final}
    return next((m for m in FAMILY_METRICS[family] if m in found), None)


def choose(trials: list[TuningTrial], family: str, default_rate: float) -> dict[Arm, Choice]:
    """Per arm, the rate with the lowest final validation metric of `family`; an exact tie goes to
    the rate nearest the default (in log), so a flat curve does not move an arm for nothing."""
    metric = family_metric(trials, family)
    choices: dict[Arm, Choice] = {}
    for arm in dict.fromkeys(t.arm for t in trials):
        values: dict[float, float | None] = {}
        for trial in sorted((t for t in trials if t.arm == arm), key=lambda t: t.rate):
            value = trial.final.get(metric) if metric else None
            values[trial.rate] = value if value is not None and math.isfinite(value) else None
        usable = [rate for rate, value in values.items() if value is not None]
        best = min(
            usable,
            key=lambda rate: (values[rate], abs(math.log(rate / default_rate)), rate),
            default=None,
        )
        choices[arm] = Choice(arm, family, metric, best, values)
    return choices


def trial_of(found: Run | Incomplete) -> TuningTrial | None:
    """A tuning trial from a scanned run: its final budget row, or (diverged) an empty one; None
    for a run that neither finished nor diverged (it says nothing about its rate yet)."""
    if isinstance(found, Run):
        rows = sorted(found.budgets, key=lambda row: row["step"])
        final = {
            k: float(v)
            for k, v in (rows[-1] if rows else {}).items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
        }
        step = rows[-1]["step"] if rows else None
        note = "" if rows else "no budget rows"
        rate = rate_of(found.config)
        return TuningTrial(found.arm, rate, final, step, note, found.optimisation, found.seed)
    if not found.diverged or found.arm is None:
        return None
    at = found.diverged_at
    note = f"diverged at step {at if at else '?'}"
    seed = found.seed if isinstance(found.seed, int) else None
    return TuningTrial(found.arm, rate_of(config_of(found)), {}, None, note, seed=seed)


def config_of(found: Run | Incomplete) -> dict:
    """A scanned run's config (an incomplete run keeps only its directory)."""
    if isinstance(found, Run):
        return found.config
    return RunDir(Path(found.directory)).read_config() or {}


def rate_of(config: dict) -> float:
    return float((config.get("optim") or {}).get("lr", math.nan))


def is_tuning(config: dict) -> bool:
    """Whether a run's config is a tuning trial's (no final evaluation, validation reference)."""
    ev = config.get("eval") or {}
    return all(ev.get(key.split(".")[1]) == value for key, value in TUNING_ONLY.items())


@dataclass
class TuningRecord:
    """What stage 1 chose: JSON for the record, a paragraph and a table for readers."""

    payload: dict
    intro: str
    header: list[str]
    rows: list[list[str]]

    @property
    def markdown(self) -> str:
        seed = self.payload["tuning_seed"]
        lines = [f"# Learning rate per arm, chosen on tuning seed {seed}", "", self.intro, ""]
        lines += ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def tuning_record(
    trials: list[TuningTrial], choices: dict[str, dict[Arm, Choice]], seed: int | None, default: float
) -> TuningRecord:
    """Per arm: the rate chosen for each family, each rate's validation metrics and gradient norms."""
    arms = list(dict.fromkeys(t.arm for t in trials))
    rates = sorted({t.rate for t in trials})
    by = {(t.arm, t.rate): t for t in trials}
    steps = sorted({t.step for t in trials if t.step is not None})
    payload = {
        "tuning_seed": seed,
        "default_rate": default,
        "rates": rates,
        "budget_step": steps[-1] if steps else None,
        "rule": "lowest final validation metric per family; exact ties go to the rate nearest the default",
        "arms": {
            arm.label: {
                "chosen": {
                    f: {"metric": c[arm].metric, "rate": c[arm].rate, "edge_of_grid": c[arm].edge}
                    for f, c in choices.items()
                },
                "by_rate": {
                    str(rate): {
                        **{f: choices[f][arm].values.get(rate) for f in choices},
                        "grad_norm_median": by[arm, rate].optimisation.get("grad_norm_median"),
                        "note": by[arm, rate].note,
                    }
                    for rate in rates
                    if (arm, rate) in by
                },
            }
            for arm in arms
        },
    }
    metrics = {f: next((c.metric for c in choices[f].values() if c.metric), None) for f in choices}
    named = ", ".join(f"{f}: {m or 'not measured'}" for f, m in metrics.items())
    intro = (
        f"Every arm trained at optim.lr {', '.join(f'{r:g}' for r in rates)} for "
        f"{payload['budget_step'] or '?'} steps on seed {seed}, a seed no verdict uses; the rate with the "
        f"lowest final validation metric is chosen per family ({named}). The shared default rate is "
        f"{default:g}. Cells: validation metric (median gradient norm over training); * = chosen, "
        "— = diverged or not measured."
    )
    edges = [c for chosen in choices.values() for c in chosen.values() if c.edge]
    if edges:
        intro += (
            f" {len(edges)} of {sum(len(c) for c in choices.values())} choices are an end of the grid, "
            "where the best rate may lie beyond it: widen RATES to bracket them."
        )
    rows = []
    for arm in arms:
        for family, chosen in choices.items():
            choice = chosen[arm]
            cells = []
            for rate in rates:
                trial = by.get((arm, rate))
                grad = trial.optimisation.get("grad_norm_median") if trial else None
                text = number(choice.values.get(rate), 4) + ("*" if rate == choice.rate else "")
                cells.append(text + (f" ({number(grad, 2)})" if grad is not None else ""))
            edge = f" ({choice.edge} of the grid)" if choice.edge else ""
            rows.append([arm.label, family, *cells, number(choice.rate) + edge])
    header = ["arm", "family", *(f"lr {r:g}" for r in rates), "chosen"]
    return TuningRecord(payload, intro, header, rows)
