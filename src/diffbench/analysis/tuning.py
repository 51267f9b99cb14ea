"""Optimiser fairness: each arm's learning rate and gradient clipping chosen on a tuning seed by a
validation metric at the final budget, one setting per claim family (likelihood: the validation
VLB; samples: the validation-reference feature distance), so no arm is judged at a step size tuned
for another; a choice at an end of the rate grid widens the grid (bounded), never read as the
optimum."""

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
CLIP_KEY = "trainer.gradient_clip_val"


@dataclass(frozen=True)
class OptimSetting:
    """One optimiser setting an arm trains at: the learning rate and the gradient-clipping
    threshold (None: no clipping). Runs at different settings are different groups."""

    lr: float
    clip: float | None = None

    @property
    def name(self) -> str:
        """`lr 0.0003` (unclipped) or `lr 0.0002, clip 1.0`, as every table and message names it."""
        return f"lr {self.lr:g}" + ("" if self.clip is None else f", clip {clip_text(self.clip)}")

    @property
    def order(self) -> tuple[float, bool, float]:
        return (self.lr, self.clip is not None, self.clip or 0.0)


DDPM = OptimSetting(2e-4, 1.0)
"""DDPM's own optimiser (Adam, lr 2e-4, gradient clipping at 1.0): always one of the compared
settings, so a reader sees each verdict under the paper's optimiser."""
TUNING_CLIPS = (None, DDPM.clip)
"""Stage 1's clipping axis: off (the default) and DDPM's threshold."""
MAX_WIDENINGS = 2
"""How many times stage 1 widens an arm's rate grid when its choice sits at an end."""


def clip_text(clip: float | None) -> str:
    """A threshold as `1.0`, or `off`."""
    return "off" if clip is None else repr(float(clip))


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
    clip: float | None = None

    @property
    def setting(self) -> OptimSetting:
        return OptimSetting(self.rate, self.clip)


@dataclass(frozen=True)
class Choice:
    """The setting an arm gets for one family, the metric that chose it, each rate's value at the
    chosen clipping (`values`) and every (rate, clip) pair's (`grid`); None: diverged or not
    measured, never a candidate."""

    arm: Arm
    family: str
    metric: str | None
    rate: float | None
    values: dict[float, float | None]
    clip: float | None = None
    grid: dict[tuple[float, float | None], float | None] = field(default_factory=dict)

    @property
    def rates(self) -> list[float]:
        """Every rate the arm trained at, at any clipping."""
        return sorted({rate for rate, _ in self.grid} or set(self.values))

    @property
    def setting(self) -> OptimSetting | None:
        return None if self.rate is None else OptimSetting(self.rate, self.clip)

    @property
    def edge(self) -> str | None:
        """ "lowest"/"highest" when the chosen rate is an end of the grid: the best rate may lie
        beyond it, and the grid should be widened before the choice is trusted."""
        rates = self.rates
        if self.rate is None or len(rates) < 2:
            return None
        return "lowest" if self.rate == rates[0] else "highest" if self.rate == rates[-1] else None


def family_metric(trials: list[TuningTrial], family: str) -> str | None:
    """The family's validation metric that the tuning trials measured, if any."""
    found = {key for trial in trials for key in trial.final}
    return next((m for m in FAMILY_METRICS[family] if m in found), None)


def choose(
    trials: list[TuningTrial], family: str, default_rate: float, default_clip: float | None = None
) -> dict[Arm, Choice]:
    """Per arm, the (rate, clip) pair with the lowest final validation metric of `family`; an
    exact tie goes to the rate nearest the default (in log), then to the default clipping, so a
    flat curve does not move an arm for nothing."""
    metric = family_metric(trials, family)
    choices: dict[Arm, Choice] = {}
    for arm in dict.fromkeys(t.arm for t in trials):
        grid: dict[tuple[float, float | None], float | None] = {}
        for trial in sorted((t for t in trials if t.arm == arm), key=lambda t: t.setting.order):
            value = trial.final.get(metric) if metric else None
            grid[trial.rate, trial.clip] = value if value is not None and math.isfinite(value) else None
        usable = [pair for pair, value in grid.items() if value is not None]
        best = min(
            usable,
            key=lambda pair: (
                grid[pair],
                abs(math.log(pair[0] / default_rate)),
                pair[1] != default_clip,
                OptimSetting(*pair).order,
            ),
            default=None,
        )
        rate, clip = best if best is not None else (None, default_clip)
        values = {r: value for (r, c), value in grid.items() if c == clip}
        choices[arm] = Choice(arm, family, metric, rate, values, clip, grid)
    return choices


def beyond(rate: float, side: str) -> float | None:
    """One rate past an end of the grid: on the 1-3-10 ladder (3e-3 → 1e-2, 1e-4 → 3e-5), else
    ×3 or ÷3 to one digit (so it gets its own summary table); None where it would reach 1."""
    exponent = math.floor(math.log10(rate))
    mantissa = round(rate / 10**exponent, 6)
    up = side == "highest"
    if mantissa == 1:
        new = float(f"3e{exponent}") if up else float(f"3e{exponent - 1}")
    elif mantissa == 3:
        new = float(f"1e{exponent + 1}") if up else float(f"1e{exponent}")
    else:
        new = float(f"{rate * 3 if up else rate / 3:.0e}")
    return new if 0 < new < 1 else None


def widening(choices: dict[str, dict[Arm, Choice]], arm: Arm) -> list[float]:
    """The rates one widening adds for an arm: one past each end of its grid that a family's
    choice sits at (none where that would reach a rate of 1)."""
    chosen = [c[arm] for c in choices.values() if arm in c]
    rates = sorted({rate for choice in chosen for rate in choice.rates})
    sides = {choice.edge for choice in chosen} - {None}
    ends = {"lowest": rates[0], "highest": rates[-1]} if rates else {}
    found = (beyond(ends[side], side) for side in sorted(sides))
    return sorted(rate for rate in found if rate is not None)


def inferred_widenings(trials: list[TuningTrial]) -> dict[Arm, list[list[float]]]:
    """Each arm's widenings read back from its trials: the rates beyond those every arm shares,
    one per side and round (the report has the trials, not the sweep's grid; one arm alone
    shows none)."""
    by_arm: dict[Arm, set[float]] = {}
    for trial in trials:
        by_arm.setdefault(trial.arm, set()).add(trial.rate)
    if len(by_arm) < 2:
        return {}
    shared = set.intersection(*by_arm.values())
    if not shared:
        return {}
    low, high = min(shared), max(shared)
    found = {}
    for arm, rates in by_arm.items():
        above = sorted(r for r in rates if r > high)
        below = sorted((r for r in rates if r < low), reverse=True)
        rounds = [sorted([*above[i : i + 1], *below[i : i + 1]]) for i in range(max(len(above), len(below)))]
        if rounds:
            found[arm] = rounds
    return found


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
        rate, clip = rate_of(found.config), clip_of(found.config)
        return TuningTrial(found.arm, rate, final, step, note, found.optimisation, found.seed, clip)
    if not found.diverged or found.arm is None:
        return None
    at = found.diverged_at
    note = f"diverged at step {at if at else '?'}"
    seed = found.seed if isinstance(found.seed, int) else None
    config = config_of(found)
    return TuningTrial(found.arm, rate_of(config), {}, None, note, seed=seed, clip=clip_of(config))


def config_of(found: Run | Incomplete) -> dict:
    """A scanned run's config (an incomplete run keeps only its directory)."""
    if isinstance(found, Run):
        return found.config
    return RunDir(Path(found.directory)).read_config() or {}


def rate_of(config: dict) -> float:
    return float((config.get("optim") or {}).get("lr", math.nan))


def clip_of(config: dict) -> float | None:
    """A run's gradient-clipping threshold (trainer.gradient_clip_val), None when off."""
    value = (config.get("trainer") or {}).get("gradient_clip_val")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def optim_of(config: dict) -> OptimSetting:
    """The optimiser setting a run's config trained at."""
    return OptimSetting(rate_of(config), clip_of(config))


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
        title = f"# Learning rate and gradient clipping per arm, chosen on tuning seed {seed}"
        lines = [title, "", self.intro, ""]
        lines += ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def number(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def chosen_text(choice: Choice) -> str:
    """`0.0003, clip off` (with where it sits in the grid when at an end)."""
    if choice.rate is None:
        return "—"
    edge = f" ({choice.edge} of the grid)" if choice.edge else ""
    return f"{number(choice.rate)}, clip {clip_text(choice.clip)}{edge}"


def widening_text(arm: Arm, rounds: list[list[float]], edges: list[str]) -> str:
    """`eps_simple: widened to 0.01 (1 of 2), to 0.03 (2 of 2); still at the highest end …`."""
    steps = [
        f"to {', '.join(f'{r:g}' for r in rates)} ({n} of {MAX_WIDENINGS})"
        for n, rates in enumerate(rounds, 1)
    ]
    text = f"{arm.label}: widened {', '.join(steps)}" if steps else f"{arm.label}: not widened"
    if edges:
        why = (
            f"after {len(rounds)} widening{'s' if len(rounds) != 1 else ''}, the bound"
            if len(rounds) >= MAX_WIDENINGS
            else "(a further rate would reach 1)"
        )
        text += (
            f"; still at the {'/'.join(sorted(set(edges)))} end of its grid {why}: "
            "the best rate may lie beyond it"
        )
    return text


def tuning_record(
    trials: list[TuningTrial],
    choices: dict[str, dict[Arm, Choice]],
    seed: int | None,
    default: float,
    default_clip: float | None = None,
    widened: dict[Arm, list[list[float]]] | None = None,
) -> TuningRecord:
    """Per arm: the (rate, clip) chosen for each family, each setting's validation metrics and
    gradient norms, and how far its rate grid was widened."""
    widened = widened or {}
    arms = list(dict.fromkeys(t.arm for t in trials))
    rates = sorted({t.rate for t in trials})
    clips = sorted({t.clip for t in trials}, key=lambda c: (c is not None, c or 0.0))
    by = {(t.arm, t.rate, t.clip): t for t in trials}
    steps = sorted({t.step for t in trials if t.step is not None})

    def cell(arm: Arm, rate: float, clip: float | None) -> dict:
        trial = by[arm, rate, clip]
        return {
            **{f: choices[f][arm].grid.get((rate, clip)) for f in choices},
            "grad_norm_median": trial.optimisation.get("grad_norm_median"),
            "clipped_fraction": trial.optimisation.get("clipped_fraction"),
            "note": trial.note,
        }

    payload = {
        "tuning_seed": seed,
        "default_rate": default,
        "default_clip": default_clip,
        "ddpm": {"lr": DDPM.lr, "clip": DDPM.clip},
        "rates": rates,
        "clips": clips,
        "max_widenings": MAX_WIDENINGS,
        "budget_step": steps[-1] if steps else None,
        "rule": "lowest final validation metric per family over (rate, clip); exact ties go to the rate "
        "nearest the default, then to the default clipping; a choice at an end of the rate grid widens "
        f"that arm's grid by one rate on that side, at most {MAX_WIDENINGS} times",
        "arms": {
            arm.label: {
                "chosen": {
                    f: {
                        "metric": c[arm].metric,
                        "rate": c[arm].rate,
                        "edge_of_grid": c[arm].edge,
                        "clip": c[arm].clip,
                    }
                    for f, c in choices.items()
                },
                "by_rate": {
                    str(rate): {
                        **{f: choices[f][arm].grid.get((rate, default_clip)) for f in choices},
                        "grad_norm_median": by[arm, rate, default_clip].optimisation.get("grad_norm_median"),
                        "note": by[arm, rate, default_clip].note,
                    }
                    for rate in rates
                    if (arm, rate, default_clip) in by
                },
                "by_setting": [
                    {"lr": rate, "clip": clip, **cell(arm, rate, clip)}
                    for rate in rates
                    for clip in clips
                    if (arm, rate, clip) in by
                ],
                "widened": widened.get(arm, []),
            }
            for arm in arms
        },
    }
    metrics = {f: next((c.metric for c in choices[f].values() if c.metric), None) for f in choices}
    named = ", ".join(f"{f}: {m or 'not measured'}" for f, m in metrics.items())
    intro = (
        f"Every arm trained at optim.lr {', '.join(f'{r:g}' for r in rates)} with gradient clipping "
        f"{' and '.join('off' if c is None else f'at {clip_text(c)}' for c in clips)} for "
        f"{payload['budget_step'] or '?'} steps on seed {seed}, a seed no verdict uses; the (rate, clip) "
        f"pair with the lowest final validation metric is chosen per family ({named}). The shared default "
        f"is {OptimSetting(default, default_clip).name}; DDPM's own setting ({DDPM.name}) is compared "
        "beside it and the tuned settings in stage 2. Cells: validation metric (median gradient norm "
        "over training); * = chosen, — = diverged or not measured, · = not trained at this rate."
    )
    edges = {arm: [c[arm].edge for c in choices.values() if arm in c and c[arm].edge] for arm in arms}
    for arm in arms:
        if widened.get(arm) or edges[arm]:
            intro += f" {widening_text(arm, widened.get(arm, []), edges[arm])}."
    count = sum(len(e) for e in edges.values())
    if count:
        intro += (
            f" {count} of {sum(len(c) for c in choices.values())} choices are an end of the grid, "
            "where the best rate may lie beyond it: widen RATES to bracket them."
        )
    rows = []
    for arm in arms:
        for family, chosen in choices.items():
            choice = chosen[arm]
            for clip in clips:
                cells = []
                for rate in rates:
                    trial = by.get((arm, rate, clip))
                    if trial is None:
                        cells.append("·")
                        continue
                    grad = trial.optimisation.get("grad_norm_median")
                    star = "*" if (rate, clip) == (choice.rate, choice.clip) else ""
                    text = number(choice.grid.get((rate, clip), choice.values.get(rate)), 4) + star
                    cells.append(text + (f" ({number(grad, 2)})" if grad is not None else ""))
                rows.append([arm.label, family, clip_text(clip), *cells, chosen_text(choice)])
    header = ["arm", "family", "clip", *(f"lr {r:g}" for r in rates), "chosen"]
    return TuningRecord(payload, intro, header, rows)
