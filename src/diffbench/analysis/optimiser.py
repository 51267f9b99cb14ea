"""Verdicts across optimiser settings (`make sweep OBJ=tuned`): every claim at the shared default
(learning rate, clipping), at DDPM's own setting (lr 2e-4, clip 1.0), at each other setting the
evaluation seeds were trained at, and at each arm's own tuned setting. A verdict that differs
between them turns with the optimiser and is not settled."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from diffbench.analysis import figures
from diffbench.analysis.claims import Claim, Setting, build_claims, final_metric_set
from diffbench.analysis.collect import (
    Incomplete,
    Run,
    Values,
    comparable_settings,
    group_margins,
    schedule_of,
    seed_values,
)
from diffbench.analysis.render import Document, Section, Table, write
from diffbench.analysis.sections import delta_text, flatten
from diffbench.analysis.settled import Agreement
from diffbench.analysis.tuning import (
    CLAIM_FAMILIES,
    CLIP_KEY,
    DDPM,
    FAMILIES,
    TUNING_ONLY,
    Choice,
    OptimSetting,
    TuningTrial,
    choose,
    clip_text,
    config_of,
    inferred_widenings,
    is_tuning,
    optim_of,
    trial_of,
    tuning_record,
)
from diffbench.analysis.verdicts import NO_VERDICT, Verdict
from diffbench.config import compose
from diffbench.core.arms import Arm
from diffbench.core.diffusion import NoiseSchedule

SMOKE = "smoke"


def default_rate() -> float:
    """The rate every arm shares unless tuned: optim.lr of the base config."""
    return float(compose([])["optim"]["lr"])


def default_clip() -> float | None:
    """The clipping every arm shares unless tuned: trainer.gradient_clip_val of the base config."""
    return optim_of(compose([])).clip


def tuning_key(config: dict) -> str:
    """What a tuning trial and an evaluation run must share to belong together: every setting
    except the seed, the arm, the optimiser setting (rate, clipping) and what only tuning trials
    change."""
    settings = flatten(comparable_settings(config))
    for key in ("optim.lr", CLIP_KEY, *TUNING_ONLY):
        settings.pop(key, None)
    return json.dumps(settings, sort_keys=True)


@dataclass
class Column:
    """One optimiser setting: which rate (and clipping) each arm trained at, the claim families it
    speaks for (a setting tuned for likelihood says nothing about the sample claims) and the
    claims there (none where the setting has not been trained yet)."""

    name: str
    families: tuple[str, ...]
    rates: dict[Arm, float]
    claims: dict[int, Claim]
    clips: dict[Arm, float | None] = field(default_factory=dict)

    def verdict(self, number: int) -> Verdict | None:
        """The claim's verdict here, or None where this setting cannot speak for it."""
        claim = self.claims.get(number)
        if claim is None or claim.verdict == Verdict.NOT_TESTED:
            return None
        return claim.verdict if set(self.families) & set(CLAIM_FAMILIES[number]) else None


@dataclass
class Tuned:
    """One tuned sweep: stage 1's trials and choices, stage 2's runs, the columns and agreements."""

    trials: list[TuningTrial]
    choices: dict[str, dict[Arm, Choice]]
    default: float
    runs: list[Run]
    columns: list[Column] = field(default_factory=list)
    agreements: dict[int, Agreement] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unfinished: int = 0
    default_clip: float | None = None

    @property
    def default_setting(self) -> OptimSetting:
        return OptimSetting(self.default, self.default_clip)

    @property
    def default_group(self) -> str:
        """The group of the evaluation runs at the shared default setting (the plain sweep's
        group), else the first group the sweep's evaluation runs fall in."""
        at_default = [r.group for r in self.runs if optim_of(r.config) == self.default_setting]
        return (at_default or [r.group for r in self.runs])[0]

    @property
    def plumbing(self) -> bool:
        """Smoke-profile evaluation runs: rates are chosen, no verdict is stated."""
        return any(r.profile == SMOKE for r in self.runs)

    @property
    def groups(self) -> set[str]:
        """Every group holding this sweep's evaluation runs (one per optimiser setting)."""
        return {r.group for r in self.runs}


def claims_at(values: Values, setting: Setting) -> dict[int, Claim]:
    return {c.number: c for c in build_claims(values, final_metric_set(values), setting, detectable=False)}


def setting_of(runs: list[Run], schedule: NoiseSchedule, variance: str) -> Setting:
    margins, conflicts = group_margins(runs)
    return Setting(schedule, variance, margins, tuple(conflicts))


def full_seeds(runs: list[Run], seeds: set[int], name: str, notes: list[str]) -> list[Run]:
    """The runs of the arms that hold every evaluation seed (those seeds only); an arm short of
    seeds is left out of the setting and named, so no setting is compared at a smaller n."""
    by_arm: dict[Arm, list[Run]] = defaultdict(list)
    for run in runs:
        if run.seed in seeds:
            by_arm[run.arm].append(run)
    short = sorted(
        (arm for arm in {r.arm for r in runs} if {r.seed for r in by_arm[arm]} != seeds),
        key=lambda a: a.label,
    )
    if short:
        notes.append(
            f"{name}: {', '.join(a.label for a in short)} left out, not trained on every evaluation seed "
            f"({', '.join(map(str, sorted(seeds)))}) at this rate"
        )
    return [r for arm, arm_runs in by_arm.items() if arm not in short for r in arm_runs]


def setting_name(setting: OptimSetting, default: OptimSetting) -> str:
    """`lr 0.001 (default)`, `lr 0.0002, clip 1.0 (DDPM)`, `lr 0.0003`: a setting as a column."""
    role = " (default)" if setting == default else " (DDPM)" if setting == DDPM else ""
    return setting.name + role


def columns(tuned: Tuned, schedule: NoiseSchedule, variance: str) -> list[Column]:
    """The default setting, DDPM's (always, even before its runs exist), every other setting with
    evaluation runs, then the settings tuned per family; every setting on the default's seeds,
    its arms only where they hold all of them."""
    setting = setting_of(tuned.runs, schedule, variance)
    default = tuned.default_setting
    seeds = {r.seed for r in tuned.runs if optim_of(r.config) == default} or {r.seed for r in tuned.runs}
    by_setting: dict[OptimSetting, list[Run]] = defaultdict(list)
    for run in tuned.runs:
        by_setting[optim_of(run.config)].append(run)
    made = []
    for optim in sorted({*by_setting, DDPM}, key=lambda s: (s != default, s != DDPM, s.order)):
        name = setting_name(optim, default)
        runs = full_seeds(by_setting.get(optim, []), seeds, name, tuned.notes)
        if runs:
            rates, clips = {r.arm: optim.lr for r in runs}, {r.arm: optim.clip for r in runs}
            made.append(Column(name, FAMILIES, rates, claims_at(seed_values(runs), setting), clips))
        elif optim == DDPM:
            tuned.notes.append(
                f"{name}: not read, not yet trained on every evaluation seed (run make sweep OBJ=tuned again)"
            )
            made.append(Column(name, FAMILIES, {}, {}))
    arms = sorted({r.arm for r in tuned.runs}, key=lambda a: a.label)
    for family in FAMILIES:
        name = f"tuned for {family}"
        chosen = tuned.choices[family]
        lost = [a for a in arms if a not in chosen or chosen[a].setting is None]
        if lost:
            tuned.notes.append(
                f"{name}: {', '.join(a.label for a in lost)} left out, no rate finished on the tuning seed"
            )
        settings = {a: chosen[a].setting for a in arms if a not in lost}
        runs = [r for r in tuned.runs if settings.get(r.arm) == optim_of(r.config)]
        runs = full_seeds(runs, seeds, name, tuned.notes)
        missing = sorted(a.label for a in set(settings) - {r.arm for r in runs})
        if missing:
            tuned.notes.append(
                f"{name}: not read, {', '.join(missing)} not yet trained at the chosen setting on every "
                "evaluation seed (run make sweep OBJ=tuned again)"
            )
        elif runs:
            rates = {a: s.lr for a, s in settings.items() if s is not None}
            clips = {a: s.clip for a, s in settings.items() if s is not None}
            made.append(Column(name, (family,), rates, claims_at(seed_values(runs), setting), clips))
    return made


def agreements(made: list[Column]) -> dict[int, Agreement]:
    numbers = sorted({n for column in made for n in column.claims})
    return {n: Agreement(n, {c.name: v for c in made if (v := c.verdict(n)) is not None}) for n in numbers}


def find_tuned(runs: list[Run], incomplete: list[Incomplete]) -> tuple[list[Tuned], list[Run]]:
    """Tuned sweeps among the scanned runs (tuning trials beside evaluation runs of the same
    settings, never on a tuning trial's seed), and the runs for the ordinary group reports
    (every run but tuning trials)."""
    trials: dict[str, list[TuningTrial]] = defaultdict(list)
    unfinished: dict[str, int] = defaultdict(int)
    for found in [*runs, *incomplete]:
        config = config_of(found)
        if not is_tuning(config):
            continue
        trial = trial_of(found)
        if trial is None:
            unfinished[tuning_key(config)] += 1
        else:
            trials[tuning_key(config)].append(trial)
    rest = [r for r in runs if not is_tuning(r.config)]
    default, clip = default_rate(), default_clip()
    found_tuned = []
    for key, stage1 in trials.items():
        tuning_seeds = {t.seed for t in stage1}
        stage2 = [r for r in rest if tuning_key(r.config) == key and r.seed not in tuning_seeds]
        if not stage2:
            continue
        choices = {family: choose(stage1, family, default, clip) for family in FAMILIES}
        tuned = Tuned(stage1, choices, default, stage2, unfinished=unfinished[key], default_clip=clip)
        schedule, variance = schedule_of(stage2)
        tuned.columns = columns(tuned, schedule, variance)
        tuned.agreements = agreements(tuned.columns)
        found_tuned.append(tuned)
    return found_tuned, rest


TUNED_STEM = "tuned"
TUNED_JSON, TUNED_MD, TUNED_HTML = (f"{TUNED_STEM}.{ext}" for ext in ("json", "md", "html"))


def verdict_table(tuned: Tuned) -> Table:
    """Claims × optimiser settings: the verdict where a setting can speak for the claim, n/a where
    it cannot (a setting tuned for the other family, or no arms to compare), not run where the
    setting has no runs yet, and the agreement."""
    rows = []
    for number, agreement in tuned.agreements.items():
        cells = []
        for column in tuned.columns:
            verdict = column.verdict(number)
            cells.append(verdict if verdict is not None else "n/a" if column.claims else "not run")
        rows.append([f"claim {number}", *cells, agreement.text])
    return Table(["claim", *(c.name for c in tuned.columns), "across optimiser settings"], rows)


def difference_table(tuned: Tuned) -> Table:
    """Every primary comparison of every claim at each setting: the paired difference with its 95%
    interval and verdict, so a reader sees how far a verdict moved, not only whether it did."""
    rows: dict[tuple[int, str, str], dict[str, str]] = {}
    for column in tuned.columns:
        for number, claim in column.claims.items():
            if column.verdict(number) is None:
                continue
            for test in claim.primary:
                for part in test.parts:
                    cell = f"{delta_text(part.comparison)}: {part.verdict}"
                    rows.setdefault((number, test.metric, part.comparison.label), {})[column.name] = cell
    names = [c.name for c in tuned.columns]
    return Table(
        ["claim", "metric", "comparison", *names],
        [
            [f"claim {n}", metric, label, *(cells.get(name, "—") for name in names)]
            for (n, metric, label), cells in rows.items()
        ],
    )


def chosen_cell(choice: Choice | None) -> str:
    """An arm's tuned setting as a cell: `0.0003` (unclipped) or `0.0003, clip 1.0`."""
    if choice is None or choice.rate is None:
        return "—"
    return str(choice.rate) + ("" if choice.clip is None else f", clip {clip_text(choice.clip)}")


def gradient_table(tuned: Tuned) -> Table | None:
    """Median gradient norm (mean over seeds) of every evaluation run per arm and optimiser
    setting: how far apart one learning rate puts the arms' step sizes."""
    settings = sorted({optim_of(r.config) for r in tuned.runs}, key=lambda s: s.order)
    rows = []
    for arm in dict.fromkeys(r.arm for r in sorted(tuned.runs, key=lambda r: r.arm.order)):
        cells = []
        for optim in settings:
            norms = [
                r.optimisation["grad_norm_median"]
                for r in tuned.runs
                if r.arm == arm
                and optim_of(r.config) == optim
                and isinstance(r.optimisation.get("grad_norm_median"), (int, float))
            ]
            cells.append(f"{sum(norms) / len(norms):.3g}" if norms else "—")
        rows.append([arm.label, *cells, *(chosen_cell(tuned.choices[f].get(arm)) for f in FAMILIES)])
    if not rows:
        return None
    return Table(["arm", *(s.name for s in settings), *(f"chosen ({f})" for f in FAMILIES)], rows)


def write_tuned(tuned: Tuned, out: Path, draw: bool = True) -> dict:
    """tuned.md, tuned.html, tuned.json (and figures/tuning.png) for one tuned sweep; the JSON."""
    return write(render_tuned(tuned), out, draw)


def render_tuned(tuned: Tuned) -> Document:
    """The tuned report of one computed tuned sweep (`find_tuned`), ready to write."""
    plumbing = tuned.plumbing
    seeds = sorted({r.seed for r in tuned.runs})
    tuning_seed = next((t.seed for t in tuned.trials if t.seed is not None), None)
    record = tuning_record(
        tuned.trials,
        tuned.choices,
        tuning_seed,
        tuned.default,
        tuned.default_clip,
        inferred_widenings(tuned.trials),
    )
    overview = Section("Verdicts across optimiser settings", "optimiser")
    if plumbing:
        overview.paragraphs.append(
            f"{NO_VERDICT}: smoke-profile runs; the rates below were chosen, no verdict is stated."
        )
    else:
        steps = sorted({r.steps for r in tuned.runs})
        overview.paragraphs.append(
            f"Each claim at {'/'.join(map(str, steps))} steps on evaluation seeds "
            f"{', '.join(map(str, seeds))} ({len(tuned.runs)} runs), with every arm at the shared default "
            f"({tuned.default_setting.name}), at DDPM's own optimiser ({DDPM.name}), at each other "
            "setting the evaluation seeds were trained at (only the arms tuned to it), and at each arm's "
            "own setting (rate and clipping) tuned for likelihood (read for claim 1) or for samples "
            "(claim 2); claims 3 and 4, which read both kinds of metric, are read at both. A setting "
            "named without clip trains unclipped. A claim is settled across the optimiser only if every "
            "setting that can test it gives the same verdict; n/a: the setting has no arms the claim "
            "compares or was tuned for the other family; not run: no runs at that setting yet. "
            f"Settings were chosen on seed {tuning_seed}, which no verdict here uses."
        )
        overview.tables.append(verdict_table(tuned))
        overview.bullets += [f"Left out — {note}." for note in tuned.notes]
        for number, agreement in tuned.agreements.items():
            claim = next(c.claims[number] for c in tuned.columns if number in c.claims)
            overview.bullets.append(f"**Claim {number}** — {claim.title}: {agreement.text}")
    differences = Section(
        "Differences at each setting",
        "differences",
        [
            "The primary comparisons behind each verdict, seed-paired, with their 95% t-intervals; "
            "— where the setting does not hold both arms or cannot speak for the claim."
        ],
        [difference_table(tuned)],
    )
    detail = Section(
        "Headlines at each setting",
        "headlines",
        ["Each setting's full headlines: which heads were tested and which need another sweep."],
    )
    if not plumbing:
        numbers = sorted(tuned.agreements)
        detail.tables.append(
            Table(
                ["setting", "rates", *(f"claim {n}" for n in numbers)],
                [
                    [
                        column.name,
                        ", ".join(
                            f"{arm.label} {rate:g}"
                            + (
                                ""
                                if column.clips.get(arm) is None
                                else f" clip {clip_text(column.clips[arm])}"
                            )
                            for arm, rate in column.rates.items()
                        ),
                        *(column.claims[n].headline if n in column.claims else "—" for n in numbers),
                    ]
                    for column in tuned.columns
                ],
            )
        )
    if tuned.unfinished:
        record.intro += (
            f" {tuned.unfinished} tuning trial(s) have not finished; the choice above is from the "
            "finished ones."
        )
    choice = Section(
        "Learning rate and clipping per arm (stage 1)",
        "tuning",
        [record.intro],
        [Table(record.header, record.rows)],
    )
    sections = [overview, *([] if plumbing else [differences, detail]), choice]
    grads = gradient_table(tuned)
    if grads is not None:
        sections.append(
            Section(
                "Gradient norms of the evaluation runs",
                "gradients",
                [
                    "Median gradient norm over training, before clipping (mean over seeds), per arm and "
                    "optimiser setting, and the settings each arm was given. AdamW divides every step by a "
                    "running RMS of the gradient, so a loss's overall scale cancels; what does not cancel "
                    "is how heavy-tailed its gradients are (the ELBO's weights span orders of magnitude "
                    "across t), so one rate need not be one effective step size for every arm."
                ],
                [grads],
            )
        )
    payload = {
        "plumbing": plumbing,
        "default_rate": tuned.default,
        "default_clip": tuned.default_clip,
        "ddpm": {"lr": DDPM.lr, "clip": DDPM.clip, "name": setting_name(DDPM, tuned.default_setting)},
        "seeds": seeds,
        "tuning": record.payload,
        "columns": [
            {
                "name": c.name,
                "families": list(c.families),
                "rates": {arm.label: rate for arm, rate in c.rates.items()},
                "clips": {arm.label: c.clips.get(arm) for arm in c.rates},
                "claims": {n: {"verdict": cl.verdict, "headline": cl.headline} for n, cl in c.claims.items()},
            }
            for c in ([] if plumbing else tuned.columns)
        ],
        "agreement": {
            n: {"agrees": a.agrees, "verdicts": a.verdicts, "text": a.text}
            for n, a in ([] if plumbing else tuned.agreements.items())
        },
    }
    title = "diffbench: verdicts at each arm's own learning rate"
    drawing = [lambda folder: figures.tuning_curves(tuned.choices, folder / "tuning.png")]
    return Document(TUNED_STEM, title, sections, payload, drawing)
