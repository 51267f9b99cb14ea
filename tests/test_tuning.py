"""OBJ=tuned: the (rate, clip) each arm gets per claim family from stage 1, a grid widened where a
choice sits at its end (at most twice), stage 2 kept off the tuning seed and always at DDPM's
setting too, and verdicts compared across optimiser settings (a verdict that turns is not settled)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffbench import launch, tuned
from diffbench.analysis.collect import scan
from diffbench.analysis.optimiser import find_tuned, tuning_key
from diffbench.analysis.settled import Agreement
from diffbench.analysis.tuning import (
    DDPM,
    LIKELIHOOD,
    MAX_WIDENINGS,
    SAMPLES,
    TUNING_ONLY,
    OptimSetting,
    TuningTrial,
    beyond,
    choose,
    inferred_widenings,
    tuning_record,
    widening,
)
from diffbench.analysis.verdicts import Verdict
from diffbench.cli import report as report_cli
from diffbench.cli.checks import check_settings
from diffbench.config import compose
from diffbench.core.arms import Arm
from diffbench.launch import LaunchOptions
from diffbench.plan import (
    TUNING_SEED,
    Sweep,
    SweepOptions,
    Trial,
    configure,
    load_sweep,
    overrides_of,
    plan,
    tuning_sweep,
    with_options,
)
from diffbench.rundir import RunDir
from diffbench.spec import RunSpec
from diffbench.sweep import main
from fabricate import write_run

RATES = (1e-4, 3e-4, 1e-3, 3e-3)
# Final validation curves over RATES: eps_elbo's VLB is best at 3e-4, its FD at 1e-3; eps_simple's
# VLB at 1e-3 and FD at 3e-3; x0_elbo diverged at 3e-3 (None), where it would otherwise be best.
CURVES = {
    "eps_elbo": {"val_vlb_bpd": [4.1, 3.6, 3.8, 4.4], "fd_digits": [90.0, 70.0, 60.0, 65.0]},
    "eps_simple": {"val_vlb_bpd": [4.3, 3.9, 3.7, 3.75], "fd_digits": [80.0, 55.0, 50.0, 45.0]},
    "x0_elbo": {"val_vlb_bpd": [9.0, 7.0, 6.0, None], "fd_digits": [99.0, 90.0, 80.0, None]},
}
EPS_ELBO, EPS_SIMPLE, X0_ELBO = (Arm.parse(label) for label in CURVES)
STAGE_TWO = {
    ("eps_elbo", 3e-4, None),
    ("eps_elbo", 1e-3, None),
    ("eps_elbo", 2e-4, 1.0),
    ("eps_simple", 1e-3, None),
    ("eps_simple", 3e-3, None),
    ("eps_simple", 2e-4, 1.0),
}
"""(arm, rate, clip) of the evaluation trials stage 2 trains from the fabricated stage 1: each arm at
the default, at its tuned rates and, always, at DDPM's own setting (lr 2e-4, clip 1.0)."""


def trials() -> list[TuningTrial]:
    made = []
    for arm, curves in CURVES.items():
        for index, rate in enumerate(RATES):
            final = {m: v[index] for m, v in curves.items() if v[index] is not None}
            note = "" if final else "diverged at step 700"
            made.append(TuningTrial(Arm.parse(arm), rate, final, 1000 if final else None, note))
    return made


def test_each_arm_gets_the_rate_with_the_lowest_validation_metric_per_family() -> None:
    likelihood = choose(trials(), LIKELIHOOD, 1e-3)
    samples = choose(trials(), SAMPLES, 1e-3)
    assert {a.label: c.rate for a, c in likelihood.items()} == {
        "eps_elbo": 3e-4,
        "eps_simple": 1e-3,
        "x0_elbo": 1e-3,
    }
    assert {a.label: c.rate for a, c in samples.items()} == {
        "eps_elbo": 1e-3,
        "eps_simple": 3e-3,
        "x0_elbo": 1e-3,
    }
    assert likelihood[EPS_ELBO].metric == "val_vlb_bpd" and samples[EPS_ELBO].metric == "fd_digits"
    assert all(choice.arm == arm for arm, choice in likelihood.items())
    # The diverged rate is no candidate, and is recorded as such.
    assert likelihood[X0_ELBO].values[3e-3] is None
    # An end of the grid is flagged (the best rate may lie beyond it); an inner rate is not.
    assert samples[EPS_SIMPLE].edge == "highest" and likelihood[EPS_ELBO].edge is None
    assert likelihood[X0_ELBO].edge is None


def test_a_tie_goes_to_the_rate_nearest_the_default_and_no_finished_rate_chooses_none() -> None:
    flat = [TuningTrial(EPS_ELBO, r, {"val_vlb_bpd": 3.0}, 1000) for r in RATES]
    assert choose(flat, LIKELIHOOD, 1e-3)[EPS_ELBO].rate == 1e-3
    assert choose(flat, LIKELIHOOD, 2e-4)[EPS_ELBO].rate == 3e-4
    broken = [TuningTrial(EPS_ELBO, r, {}, None, "diverged at step 3") for r in RATES]
    assert choose(broken, LIKELIHOOD, 1e-3)[EPS_ELBO].rate is None
    # A tie between clipping off and on goes to the default (off).
    both = flat + [TuningTrial(EPS_ELBO, r, {"val_vlb_bpd": 3.0}, 1000, clip=1.0) for r in RATES]
    assert (choose(both, LIKELIHOOD, 1e-3)[EPS_ELBO].rate, choose(both, LIKELIHOOD, 1e-3)[EPS_ELBO].clip) == (
        1e-3,
        None,
    )


def clipped(shift: dict[str, float]) -> list[TuningTrial]:
    """trials() again, each arm also at clip 1.0 with its metrics moved by `shift[arm]`."""
    made = trials()
    for trial in list(made):
        final = {m: v + shift.get(trial.arm.label, 0.0) for m, v in trial.final.items()}
        made.append(TuningTrial(trial.arm, trial.rate, final, trial.step, trial.note, clip=1.0))
    return made


def test_the_choice_is_the_best_rate_and_clip_pair() -> None:
    # Clipping helps eps_elbo (every metric 0.5 lower) and hurts eps_simple.
    found = clipped({"eps_elbo": -0.5, "eps_simple": 0.5, "x0_elbo": 0.5})
    likelihood, samples = choose(found, LIKELIHOOD, 1e-3), choose(found, SAMPLES, 1e-3)
    assert (likelihood[EPS_ELBO].rate, likelihood[EPS_ELBO].clip) == (3e-4, 1.0)
    assert (samples[EPS_ELBO].rate, samples[EPS_ELBO].clip) == (1e-3, 1.0)
    assert (likelihood[EPS_SIMPLE].rate, likelihood[EPS_SIMPLE].clip) == (1e-3, None)
    assert likelihood[EPS_ELBO].setting == OptimSetting(3e-4, 1.0)
    # `values` is the curve at the chosen clipping; `grid` holds every (rate, clip) pair.
    assert likelihood[EPS_ELBO].values == pytest.approx({3e-4: 3.1, 1e-4: 3.6, 1e-3: 3.3, 3e-3: 3.9})
    assert len(likelihood[EPS_ELBO].grid) == 8 and likelihood[EPS_ELBO].grid[3e-4, None] == 3.6
    # The record shows the clipping: chosen per family, one row per clip, every setting's values.
    choices = {LIKELIHOOD: likelihood, SAMPLES: samples}
    record = tuning_record(found, choices, TUNING_SEED, 1e-3)
    assert record.payload["clips"] == [None, 1.0]
    assert record.payload["ddpm"] == {"lr": 2e-4, "clip": 1.0}
    assert record.payload["arms"]["eps_elbo"]["chosen"]["likelihood"]["clip"] == 1.0
    assert record.payload["arms"]["eps_elbo"]["by_rate"]["0.0003"]["likelihood"] == 3.6
    settings = record.payload["arms"]["eps_elbo"]["by_setting"]
    assert len(settings) == 8 and {"lr": 3e-4, "clip": 1.0} == {k: settings[3][k] for k in ("lr", "clip")}
    assert "clip" in record.header and "| eps_elbo | likelihood | 1.0 | 3.6 | 3.1* |" in record.markdown
    assert (
        "0.0003, clip 1.0" in record.markdown and "DDPM's own setting (lr 0.0002, clip 1.0)" in record.intro
    )


def test_a_choice_at_an_end_of_the_grid_widens_it_one_rate_on_that_side() -> None:
    assert beyond(3e-3, "highest") == 1e-2 and beyond(1e-2, "highest") == 3e-2
    assert beyond(1e-4, "lowest") == 3e-5 and beyond(3e-4, "lowest") == 1e-4
    assert beyond(2e-4, "highest") == 6e-4 and beyond(2e-4, "lowest") == 7e-5
    assert beyond(0.3, "highest") is None  # rates stay below 1
    choices = {f: choose(trials(), f, 1e-3) for f in (LIKELIHOOD, SAMPLES)}
    assert widening(choices, EPS_SIMPLE) == [1e-2]  # its sample choice sits at 3e-3, the top
    assert widening(choices, EPS_ELBO) == [] and widening(choices, X0_ELBO) == []
    # The report reads the widenings back from the trials: rates beyond those every arm shares.
    wider = trials() + [
        TuningTrial(EPS_SIMPLE, r, {"fd_digits": fd}, 1000) for r, fd in ((1e-2, 40.0), (3e-2, 39.0))
    ]
    assert inferred_widenings(wider) == {EPS_SIMPLE: [[1e-2], [3e-2]]}
    record = tuning_record(
        wider,
        {f: choose(wider, f, 1e-3) for f in (LIKELIHOOD, SAMPLES)},
        100,
        1e-3,
        None,
        inferred_widenings(wider),
    )
    assert "eps_simple: widened to 0.01 (1 of 2), to 0.03 (2 of 2); still at the highest end" in record.intro
    assert record.payload["arms"]["eps_simple"]["widened"] == [[1e-2], [3e-2]]
    assert "·" in record.markdown  # other arms were not trained at the widened rates


def run_check(overrides: list[str], here: bool) -> RunSpec:
    """The run command's check, as `make sweep` hands it to the plan."""
    return check_settings(compose(overrides), here)


def test_stage_one_is_the_tuning_seed_alone_without_evaluation() -> None:
    base = with_options(load_sweep("tuned", "eps"), "smoke", None, "3", [])
    stage1 = tuning_sweep(base, list(RATES), TUNING_SEED)
    points = stage1.grid()
    # Every arm × rate × clipping (off, and DDPM's 1.0).
    assert len(points) == 2 * len(RATES) * 2
    assert {p["seed"] for p in points} == {TUNING_SEED}
    assert all(p["eval.enabled"] is False and p["eval.reference_split"] == "val" for p in points)
    assert sorted({p["optim.lr"] for p in points}) == list(RATES)
    assert {p["trainer.gradient_clip_val"] for p in points} == {"null", 1.0}
    specs = [run_check(overrides_of(stage1.command_of(p)), True) for p in points[:2]]
    assert [s.optim.gradient_clip_val for s in specs] == [None, 1.0]


def test_stage_two_trains_the_evaluation_seeds_at_the_default_and_the_chosen_rates(tmp_path: Path) -> None:
    base = with_options(load_sweep("tuned", "eps"), "smoke", None, "2", [f"run.root={tmp_path}"])
    evaluation = plan(base, SweepOptions(), run_check)
    dirs = [t.directory for t in evaluation]
    stages = tuned.TunedPlan(base, evaluation, tuning_sweep(base, list(RATES), TUNING_SEED), [])
    choices = {LIKELIHOOD: choose(trials(), LIKELIHOOD, 1e-3), SAMPLES: choose(trials(), SAMPLES, 1e-3)}
    made = tuned.stage_two(stages, tuned.Tuning(trials(), choices, 1e-3, None), run_check)  # type: ignore[arg-type]
    stage2, stage2_dirs = [t.point for t in made], [t.directory for t in made]
    assert {p["seed"] for p in stage2} == {0, 1}
    by_arm = {(p["experiment"], p["optim.lr"], p.get("trainer.gradient_clip_val")) for p in stage2}
    # DDPM's own setting (lr 2e-4, clip 1.0) is always one of them, for every arm.
    assert by_arm == STAGE_TWO
    assert len(stage2) == len(set(stage2_dirs)) == 12
    assert {t.spec.optim.gradient_clip_val for t in made if t.point["optim.lr"] == 2e-4} == {1.0}
    # The default-rate trials are the plain sweep's very trials (the same directories), so they are reused.
    assert set(dirs) <= set(stage2_dirs)


def test_the_tuning_seed_among_the_evaluation_seeds_is_refused(capsys: pytest.CaptureFixture) -> None:
    code = main(["--obj", "tuned", "--tune-of", "eps", "--profile", "smoke", "--seeds", "0,100"])
    assert code == 2
    assert "SEEDS includes 100, the seed OBJ=tuned chooses the learning rates on" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--obj", "tuned", "--rates", "1e-3"],
        ["--obj", "tuned", "--rates", "0.001,abc"],
        ["--obj", "tuned", "--rates", "0,1e-3"],
        ["--obj", "tuned", "--tune-of", "tuned"],
        ["--obj", "all", "--tune-of", "grid"],
        ["--obj", "all", "--rates", "1e-3,3e-3"],
        ["--obj", "tuned", "--args", "optim.lr=0.01"],
        ["--obj", "tuned", "--args", "+optim.lr=0.01"],
        ["--obj", "tuned", "--args", "seed=5"],
        ["--obj", "all", "--args", "seed=100"],
        ["--obj", "tuned", "--args", "eval.reference_split=test"],
        ["--obj", "tuned", "--args", "eval.enabled=false"],
        ["--obj", "tuned", "--args", "trainer.gradient_clip_val=1.0"],
        ["--obj", "tuned", "--args", "trainer.max_steps=2 'x"],
        ["--obj", "tuned", "--seeds", ""],
        ["--obj", "tuned", "--tune-of", ""],
        ["--obj", "tuned", "--tune-of", "../sweeps/all"],
        ["--obj", "./all"],
        ["--obj", "all", "--jobs=-1"],
        ["--obj", "all", "--gpus=-1"],
        ["--obj", "all", "--trials-per-gpu", "0"],
        ["--obj", "all", "--time", "0"],
    ],
)
def test_bad_tuning_options_are_refused_before_anything_runs(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffbench.sweep: ") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


SEEDS = (0, 1, 2, 3, 4)
TUNING = {**{k.split(".")[1]: v for k, v in TUNING_ONLY.items()}}


def tuned_runs(root: Path, ddpm: bool = False) -> None:
    """Stage 1 chooses 3e-4 for eps_elbo's likelihood, 3e-3 for eps_simple's samples. At the
    default rate eps_elbo's NLL is 0.3 bpd worse than eps_simple's (claim 1 contradicted); at its
    tuned rate 0.2 better (claim 1 holds). eps_simple's FD is 10 lower at every rate (claim 2
    holds everywhere). Budget rows are flat and agree, so only the optimiser can unsettle. With
    `ddpm`, stage 1 has clipped trials too (worse, so the choice stands) and the evaluation seeds
    ran at DDPM's setting, where eps_elbo's NLL is 0.2 better (claim 1 holds)."""
    for arm, curves in CURVES.items():
        if arm == "x0_elbo":
            continue
        for index, rate in enumerate(RATES):
            for clip in (None, 1.0) if ddpm else (None,):
                shift = 0.5 if clip else 0.0
                row = {"step": 100, **{m: v[index] + shift for m, v in curves.items()}}
                name = f"t{rate:g}" + ("-clip" if clip else "")
                write_run(
                    root,
                    Arm.parse(arm),
                    100,
                    {"val/vlb_bpd": 1.0},
                    [row],
                    name,
                    lr=rate,
                    evaluation=TUNING,
                    clip=clip,
                )
    for seed in SEEDS:
        jitter = 0.01 * seed
        for arm, rate, nll, fd, clip in (
            ("eps_simple", 1e-3, 3.5 + jitter, 40.0 + seed, None),
            ("eps_elbo", 1e-3, 3.8 + 2 * jitter, 50.0 + seed, None),
            ("eps_elbo", 3e-4, 3.3 + 2 * jitter, 52.0 + seed, None),
            ("eps_simple", 3e-3, 3.6 + jitter, 41.0 + seed, None),
            *(
                [
                    ("eps_simple", 2e-4, 3.5 + jitter, 40.0 + seed, 1.0),
                    ("eps_elbo", 2e-4, 3.3 + 2 * jitter, 50.0 + seed, 1.0),
                ]
                if ddpm
                else []
            ),
        ):
            final = {"nll_vlb_bpd": nll, "fd_digits": fd}
            rows = [{"step": s, "val_vlb_bpd": nll, "fd_digits": fd} for s in (50, 100)]
            name = f"s{seed}-{rate:g}" + ("-clip" if clip else "")
            write_run(root, Arm.parse(arm), seed, final, rows, name, lr=rate, evaluation={}, clip=clip)


def test_selection_from_scanned_runs_leaves_the_tuning_seed_out(tmp_path: Path) -> None:
    tuned_runs(tmp_path)
    # An evaluated run on the tuning seed (a plain sweep with SEEDS=101) must not reach a verdict.
    write_run(tmp_path, Arm.parse("eps_elbo"), 100, {"nll_vlb_bpd": 9.0}, [], "s100", lr=1e-3, evaluation={})
    runs, incomplete = scan(tmp_path)
    (tuned,), rest = find_tuned(runs, incomplete)
    assert len(tuned.trials) == 8 and len(rest) == 21 and len(tuned.runs) == 20
    assert 100 not in {r.seed for r in tuned.runs}
    assert tuned.choices[LIKELIHOOD][EPS_ELBO].rate == 3e-4
    assert tuned.choices[SAMPLES][EPS_SIMPLE].rate == 3e-3
    assert {t.arm for t in tuned.trials} == {EPS_ELBO, EPS_SIMPLE}


def resolved(sweep: Sweep, point: dict) -> dict:
    """The config a trial of this sweep point writes to its config.yaml."""
    return run_check(overrides_of(sweep.command_of(point)), True).resolved


def test_the_tuning_key_pairs_real_stage_one_and_stage_two_configs(tmp_path: Path) -> None:
    base = with_options(
        load_sweep("tuned", "eps"), "default", None, "2", [f"run.root={tmp_path}", "run.reuse=true"]
    )
    stage1 = tuning_sweep(base, list(RATES), TUNING_SEED)
    one = resolved(stage1, stage1.grid()[0])
    two = resolved(base, {**base.grid()[-1], "optim.lr": 3e-3})
    assert one["seed"] == 100 and two["seed"] == 1 and one["objective"] != two["objective"]
    assert tuning_key(one) == tuning_key(two)
    other = with_options(
        load_sweep("tuned", "eps"),
        "default",
        None,
        "2",
        [f"run.root={tmp_path}", "data.batch_size=64"],
    )
    assert tuning_key(resolved(other, other.grid()[0])) != tuning_key(two)


def test_a_verdict_that_turns_with_the_optimiser_is_not_settled(tmp_path: Path) -> None:
    tuned_runs(tmp_path)
    assert report_cli.main(["--runs", str(tmp_path), "--no-figures"]) == 0
    (folder,) = (tmp_path / "report").glob("*-tuned")
    payload = json.loads((folder / "tuned.json").read_text())
    columns = {c["name"]: c for c in payload["columns"]}
    assert columns["lr 0.001 (default)"]["claims"]["1"]["verdict"] == Verdict.CONTRADICTED
    assert columns["tuned for likelihood"]["claims"]["1"]["verdict"] == Verdict.HOLDS
    one, two = payload["agreement"]["1"], payload["agreement"]["2"]
    assert one["agrees"] is False and one["text"].startswith("turns with the optimiser")
    # Claim 2 holds at the default and tuned for samples; lr 3e-4 and 3e-3 hold one arm each (no test),
    # and the rates tuned for likelihood do not speak for a sample claim.
    assert two["agrees"] is True and set(two["verdicts"]) == {"lr 0.001 (default)", "tuned for samples"}
    # The default-rate group's own report: claim 1 settled along the budget, yet not settled overall.
    default = json.loads(
        (tmp_path / "report" / folder.name.removesuffix("-tuned") / "report.json").read_text()
    )
    claims = {c["number"]: c for c in default["claims"]}
    assert claims[1]["status"]["settled"] and not claims[1]["settled"]
    assert claims[1]["optimiser"]["agrees"] is False
    assert claims[2]["settled"] and claims[2]["optimiser"]["agrees"] is True
    md = (folder / "tuned.md").read_text()
    assert "| claim 1 | contradicted |" in md and "turns with the optimiser" in md
    line = next(
        b
        for b in (tmp_path / "report" / folder.name.removesuffix("-tuned") / "report.md")
        .read_text()
        .splitlines()
        if b.startswith("- **Claim 1**")
    )
    assert (
        "— provisional: turns with the optimiser: contradicted at lr 0.001 (default); "
        "holds at tuned for likelihood" in line
    )
    # Tuning trials form no group report of their own.
    assert len([p for p in (tmp_path / "report").iterdir() if p.is_dir()]) == 4


def test_the_verdict_at_ddpms_setting_is_compared_beside_the_default_and_the_tuned(tmp_path: Path) -> None:
    tuned_runs(tmp_path, ddpm=True)
    runs, incomplete = scan(tmp_path)
    (found,), rest = find_tuned(runs, incomplete)
    # Clipped and unclipped trials form one tuned sweep; the clipped ones are worse, so the choice stands.
    assert len(found.trials) == 16 and {t.clip for t in found.trials} == {None, 1.0}
    assert found.choices[LIKELIHOOD][EPS_ELBO].setting == OptimSetting(3e-4, None)
    # Clipping splits the group: DDPM's runs are a group of their own, beside each rate's.
    assert len({r.group for r in found.runs}) == 4 and len(found.groups) == 4
    names = [c.name for c in found.columns]
    assert names == [
        "lr 0.001 (default)",
        "lr 0.0002, clip 1.0 (DDPM)",
        "lr 0.0003",
        "lr 0.003",
        "tuned for likelihood",
        "tuned for samples",
    ]
    one = found.agreements[1]
    assert one.verdicts == {
        "lr 0.001 (default)": Verdict.CONTRADICTED,
        "lr 0.0002, clip 1.0 (DDPM)": Verdict.HOLDS,
        "tuned for likelihood": Verdict.HOLDS,
    }
    assert found.agreements[2].agrees is True and "lr 0.0002, clip 1.0 (DDPM)" in found.agreements[2].verdicts
    assert report_cli.main(["--runs", str(tmp_path), "--no-figures"]) == 0
    (folder,) = (tmp_path / "report").glob("*-tuned")
    md = (folder / "tuned.md").read_text()
    assert "| claim 1 | contradicted | holds |" in md
    assert "DDPM's own optimiser (lr 0.0002, clip 1.0)" in md
    payload = json.loads((folder / "tuned.json").read_text())
    ddpm = next(c for c in payload["columns"] if c["name"] == payload["ddpm"]["name"])
    assert (
        ddpm["clips"] == {"eps_simple": 1.0, "eps_elbo": 1.0}
        and ddpm["claims"]["1"]["verdict"] == Verdict.HOLDS
    )
    assert payload["tuning"]["arms"]["eps_elbo"]["chosen"]["likelihood"]["clip"] is None


def test_ddpms_column_is_there_before_its_runs(tmp_path: Path) -> None:
    tuned_runs(tmp_path)
    runs, incomplete = scan(tmp_path)
    (found,), _ = find_tuned(runs, incomplete)
    ddpm = next(c for c in found.columns if c.name == "lr 0.0002, clip 1.0 (DDPM)")
    assert ddpm.claims == {} and DDPM == OptimSetting(2e-4, 1.0)
    assert any(n.startswith("lr 0.0002, clip 1.0 (DDPM): not read") for n in found.notes)
    assert report_cli.main(["--runs", str(tmp_path), "--no-figures"]) == 0
    (folder,) = (tmp_path / "report").glob("*-tuned")
    assert "| claim 1 | contradicted | not run |" in (folder / "tuned.md").read_text()


def rising(arm: str, metric: str, rate: float, clip: float | None) -> float:
    """A stage 1 where eps_simple only gets better with the rate (its grid never brackets the
    optimum) and eps_elbo is best at 1e-3."""
    if arm == "eps_simple":
        return 10.0 - rate * 100 + (0.1 if clip else 0.0)
    return 5.0 + abs(rate - 1e-3) * 100


def test_widening_is_bounded_at_two_and_a_choice_still_at_the_edge_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls: list[list[dict]] = []
    monkeypatch.setattr(launch, "run_local", fake_trials(calls, rising))
    monkeypatch.setenv("WANDB_MODE", "offline")
    options = SweepOptions("tuned", "eps", seeds="1", args=f"run.root={tmp_path}", rates="3e-4,1e-3,3e-3")
    sweep = configure(options)
    stages = tuned.prepare(sweep, plan(sweep, options, run_check), options, run_check)
    result = tuned.run(stages, LaunchOptions(), run_check)
    first, *widenings, stage2 = calls
    assert len(first) == 2 * 3 * 2 and len(widenings) == MAX_WIDENINGS == 2
    for rate, widened in zip((1e-2, 3e-2), widenings):
        assert {(p["experiment"], p["optim.lr"]) for p in widened} == {("eps_simple", rate)} and len(
            widened
        ) == 2
    assert result.tuning is not None
    assert result.tuning.widened == {EPS_SIMPLE: [[1e-2], [3e-2]]}
    choice = result.tuning.choices[LIKELIHOOD][EPS_SIMPLE]
    assert (choice.rate, choice.clip, choice.edge) == (3e-2, None, "highest")
    record = json.loads(next((tmp_path / "trials").glob("*/tuning-*.json")).read_text())
    assert record["arms"]["eps_simple"]["chosen"]["likelihood"]["edge_of_grid"] == "highest"
    assert record["arms"]["eps_simple"]["widened"] == [[1e-2], [3e-2]]
    md = next((tmp_path / "trials").glob("*/tuning-*.md")).read_text()
    assert (
        "eps_simple: widened to 0.01 (1 of 2), to 0.03 (2 of 2); still at the highest end of its grid "
        "after 2 widenings, the bound" in md
    )
    # Stage 2: the default, DDPM's setting and each arm's tuned setting (eps_simple at the widened 3e-2).
    assert {(p["experiment"], p["optim.lr"], p.get("trainer.gradient_clip_val")) for p in stage2} == {
        ("eps_elbo", 1e-3, None),
        ("eps_elbo", 2e-4, 1.0),
        ("eps_simple", 1e-3, None),
        ("eps_simple", 2e-4, 1.0),
        ("eps_simple", 3e-2, None),
    }


def test_a_diverged_tuning_trial_is_recorded_not_reported_as_incomplete(tmp_path: Path) -> None:
    tuned_runs(tmp_path)
    directory = next((tmp_path / "trials").rglob("t0.003"))
    results = RunDir(directory).read_results()
    RunDir(directory).write_results({**results, "status": "diverged", "diverged_at_step": 700})
    runs, incomplete = scan(tmp_path)
    (tuned,), _ = find_tuned(runs, incomplete)
    diverged = [t for t in tuned.trials if t.note.startswith("diverged")]
    assert len(diverged) == 1 and diverged[0].final == {} and diverged[0].rate == 3e-3


def curve_value(arm: str, metric: str, rate: float, clip: float | None) -> float | None:
    """Stage 1's numbers in the fake runner: CURVES (a little worse with clipping), and a rate past
    RATES (a widened grid) worse than any in it, so one widening brackets the choice."""
    if rate not in RATES:
        return 99.0
    value = CURVES[arm][metric][RATES.index(rate)]
    return None if value is None else value + (0.05 if clip else 0.0)


def fake_trials(calls: list[list[dict]], stage1=curve_value):
    """A stand-in for the local runner: each trial's real config and results with `stage1`'s
    numbers (stage 1) or an NLL that favours eps_elbo at 3e-4 and at DDPM's setting (stage 2), so
    the sweep's own stages run in a second. Trials that already have results are skipped, as
    run.reuse does."""

    def run_local(trials: list[Trial], env: dict, slots: list, jobs: object = None) -> None:
        calls.append([t.point for t in trials])
        for trial in trials:
            point, directory, spec = trial.point, trial.directory, trial.spec
            run_dir = RunDir(directory)
            if (directory / "results.json").is_file():
                continue
            directory.mkdir(parents=True, exist_ok=True)
            run_dir.write_config(spec)
            arm, rate, seed, clip = spec.arm.label, spec.optim.lr, spec.seed, spec.optim.gradient_clip_val
            if point.get("eval.enabled") is False:
                row = {"step": 1000, **{m: stage1(arm, m, rate, clip) for m in CURVES[arm]}}
                metrics = {"val/vlb_bpd": 1.0}
            else:
                elbo = arm == "eps_elbo"
                nll = 3.5 + (0.03 if elbo else 0.01) * seed + (0.3 if elbo and rate == 1e-3 else 0.0)
                nll -= 0.5 if elbo and rate in (3e-4, 2e-4) else 0.0
                metrics = {"nll_vlb_bpd": nll, "fd_digits": 40.0 + (10 + 2 * seed if elbo else seed)}
                row = {"step": 1000, "val_vlb_bpd": nll, "fd_digits": metrics["fd_digits"]}
            run_dir.write_results(
                {
                    "status": "complete",
                    "arm": arm,
                    "seed": seed,
                    "steps": 1000,
                    "metrics": metrics,
                    "budgets": [row],
                }
            )

    return run_local


def test_the_tuned_sweep_runs_both_stages_and_a_rerun_skips_stage_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    calls: list[list[dict]] = []
    monkeypatch.setattr(launch, "run_local", fake_trials(calls))
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = ["--obj", "tuned", "--tune-of", "eps", "--seeds", "3", "--args", f"run.root={tmp_path}"]
    assert main(argv) == 0
    stage1, widened, stage2 = calls
    # Stage 1 trains every arm at every rate with clipping off and on.
    assert {p["seed"] for p in stage1} == {100} and len(stage1) == 2 * len(RATES) * 2
    assert {p["trainer.gradient_clip_val"] for p in stage1} == {"null", 1.0}
    # eps_simple's sample choice sat at the top (3e-3): its grid alone widens to 1e-2, both clippings.
    assert {(p["experiment"], p["optim.lr"], p["trainer.gradient_clip_val"]) for p in widened} == {
        ("eps_simple", 1e-2, "null"),
        ("eps_simple", 1e-2, 1.0),
    }
    assert {p["seed"] for p in stage2} == {0, 1, 2}
    assert {(p["experiment"], p["optim.lr"], p.get("trainer.gradient_clip_val")) for p in stage2} == STAGE_TWO
    record = json.loads(next((tmp_path / "trials").glob("*/tuning-*.json")).read_text())
    chosen = record["arms"]["eps_elbo"]["chosen"]["likelihood"]
    assert {k: chosen[k] for k in ("metric", "rate", "edge_of_grid")} == {
        "metric": "val_vlb_bpd",
        "rate": 3e-4,
        "edge_of_grid": None,
    }
    assert chosen["clip"] is None
    # Widened once, the choice is bracketed: no longer at an end of the grid.
    assert record["arms"]["eps_simple"]["chosen"]["samples"]["edge_of_grid"] is None
    assert record["arms"]["eps_simple"]["widened"] == [[1e-2]] and record["arms"]["eps_elbo"]["widened"] == []
    md = next((tmp_path / "trials").glob("*/tuning-*.md")).read_text()
    assert "eps_simple: widened to 0.01 (1 of 2)" in md
    (folder,) = (tmp_path / "report").glob("*-tuned")
    payload = json.loads((folder / "tuned.json").read_text())
    agreement = payload["agreement"]
    assert agreement["1"]["agrees"] is False
    names = [c["name"] for c in payload["columns"]]
    assert names[:2] == ["lr 0.001 (default)", "lr 0.0002, clip 1.0 (DDPM)"]
    assert {"tuned for likelihood", "tuned for samples"} <= set(names)
    tuned_md = (folder / "tuned.md").read_text()
    assert "| claim | lr 0.001 (default) | lr 0.0002, clip 1.0 (DDPM) |" in tuned_md
    out = capsys.readouterr().out
    assert (
        "claim 1: turns with the optimiser: contradicted at lr 0.001 (default); "
        "holds at lr 0.0002, clip 1.0 (DDPM), tuned for likelihood" in out
    )
    assert "with gradient clipping off and at 1.0" in out and "stage 1 widened" in out
    calls.clear()
    assert main(argv) == 0
    (again,) = calls
    assert again == stage2
    out = capsys.readouterr().out
    assert "(0 to run)" in out and "eps_simple at optim.lr 0.01 (1 of 2)" in out
    # The library flow the command drives: a typed result with the choice, stage 2 and the agreement.
    options = SweepOptions("tuned", "eps", seeds="3", args=f"run.root={tmp_path}")
    sweep = configure(options)
    result = tuned.run(
        tuned.prepare(sweep, plan(sweep, options, run_check), options, run_check), LaunchOptions(), run_check
    )
    assert result.stage == 2 and result.outcome.code is None and not result.missing
    assert result.tuning is not None and result.tuning.choices[LIKELIHOOD][EPS_ELBO].rate == 3e-4
    assert [t.point for t in result.stage2] == stage2
    assert tuned.agreements(result.stage2)[1].agrees is False


def test_a_weaker_verdict_elsewhere_changes_but_does_not_turn() -> None:
    weaker = Agreement(1, {"lr 0.001 (default)": Verdict.HOLDS, "tuned for likelihood": Verdict.NOT_SHOWN})
    assert weaker.agrees is False and not weaker.turns
    assert weaker.text.startswith("changes with the optimiser: holds at lr 0.001 (default)")
    opposite = Agreement(1, {"a": Verdict.HOLDS, "b": Verdict.CONTRADICTED, "c": Verdict.HOLDS})
    assert opposite.turns and opposite.text == "turns with the optimiser: holds at a, c; contradicted at b"
    assert Agreement(1, {"a": Verdict.HOLDS}).agrees is None


def test_a_tuned_column_missing_a_seed_is_not_read_and_says_why(tmp_path: Path) -> None:
    tuned_runs(tmp_path)
    (victim,) = (tmp_path / "trials").rglob("s2-0.0003")
    (victim / "results.json").unlink()
    runs, incomplete = scan(tmp_path)
    (tuned,), _ = find_tuned(runs, incomplete)
    assert "tuned for likelihood" not in [c.name for c in tuned.columns]
    assert any(n.startswith("tuned for likelihood: not read, eps_elbo not yet trained") for n in tuned.notes)
    assert any(
        n.startswith("lr 0.0003: eps_elbo left out, not trained on every evaluation seed")
        for n in tuned.notes
    )
    # With no other setting able to test claim 1, its agreement is unknown: not settled.
    assert tuned.agreements[1].agrees is None


def test_slurm_without_slurm_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_slurm(*args: object) -> list:
        raise RuntimeError('Could not detect "srun", are you indeed on a slurm cluster?')

    monkeypatch.setattr(launch, "submit_slurm", no_slurm)
    monkeypatch.setenv("WANDB_MODE", "offline")
    argv = [
        "--obj",
        "eps_simple",
        "--profile",
        "smoke",
        "--launcher",
        "slurm",
        "--args",
        f"run.root={tmp_path}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffbench.sweep: LAUNCHER=slurm could not submit") and err.count("\n") == 1
    assert "LAUNCHER=local-jobs" in err and not (tmp_path / "trials").exists()
