"""The report from synthetic run directories whose numbers, intervals and verdicts are known by
hand, including failing claims, broken runs and a real headless browser."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffbench.analysis import report
from diffbench.analysis.claims import claim_elbo_likelihood, claim_equivalence
from diffbench.analysis.collect import ARM_PARTS, ARMS, from_wandb, load_run
from diffbench.analysis.stats import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NO_DATA,
    Interval,
    bootstrap_interval,
    combine,
    directional_verdict,
    equivalence_verdict,
)
from diffbench.cli import report as report_cli
from diffbench.core.diffusion import NoiseSchedule
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.rundir import EPS_MSE_BY_T, VLB_TERMS, RunDir

# Exact bootstrap of the mean of {1, 2, 3}: the 27 resample means have sums 3..9 with counts
# 1, 3, 6, 7, 6, 3, 1; numpy's linear 2.5% quantile sits 0.65 of the way from 1 to 4/3 and the
# 97.5% one 0.35 of the way from 8/3 to 3.
LOW_123, HIGH_123 = 1 + 0.65 / 3, 8 / 3 + 0.35 / 3
SEEDS = (0, 1, 2)
GROUP = "default-digits-100steps"
PROFILE_T = [1, 2, 5, 10, 50, 100, 500, 1000]


def test_exact_bootstrap_matches_hand_computation() -> None:
    interval = bootstrap_interval([1.0, 2.0, 3.0])
    assert (interval.mean, interval.n) == (2.0, 3)
    assert interval.low == pytest.approx(LOW_123, abs=1e-12)
    assert interval.high == pytest.approx(HIGH_123, abs=1e-12)
    assert bootstrap_interval([5.0]) == Interval(5.0, 5.0, 5.0, 1)
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_monte_carlo_bootstrap_agrees_with_normal_theory() -> None:
    values = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    interval = bootstrap_interval(values.tolist(), resamples=20_000, seed=1)
    half_width = 1.96 * values.std(ddof=1) / math.sqrt(len(values))
    assert interval.high - interval.mean == pytest.approx(half_width, rel=0.1)
    assert interval.mean - interval.low == pytest.approx(half_width, rel=0.1)
    assert bootstrap_interval(values.tolist(), seed=1) == interval


def test_verdict_rules() -> None:
    below, around, above = Interval(-2, -3, -1, 3), Interval(0, -1, 1, 3), Interval(2, 1, 3, 3)
    assert directional_verdict(below, "negative") == HOLDS
    assert directional_verdict(above, "negative") == FAILS
    assert directional_verdict(around, "negative") == INCONCLUSIVE
    assert directional_verdict(Interval(-2, -2, -2, 1), "negative") == NO_DATA
    assert directional_verdict(None, "negative") == NO_DATA
    assert equivalence_verdict(around) == HOLDS and equivalence_verdict(below) == FAILS
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, HOLDS, NO_DATA]) == INCONCLUSIVE
    assert combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([HOLDS, FAILS, INCONCLUSIVE]) == FAILS
    assert combine([NO_DATA]) == NO_DATA


# Per seed (k = 1, 2, 3). ELBO arms are equivalent in NLL (paired differences centred on zero);
# simple arms are worse by 0.3 + 0.1 k bits/dim. Sample quality: simple wins for eps and score
# but loses badly for x0, so claim 2 fails, and so does claim 3's "same effect on every head".
ELBO_NLL = {"eps": [3.7, 3.8, 3.6], "x0": [3.8, 3.7, 3.6], "score": [3.6, 3.8, 3.7]}
GAP = [0.4, 0.5, 0.6]
FD = {
    "eps_simple": [10, 11, 12],
    "eps_elbo": [20, 22, 24],
    "x0_simple": [40, 44, 48],
    "x0_elbo": [21, 22, 23],
    "score_simple": [12, 13, 14],
    "score_elbo": [20, 22, 24],
}


def arm_metrics(arm: str, index: int) -> dict[str, float]:
    head, weighting = ARM_PARTS[arm]
    nll = ELBO_NLL[head][index] + (GAP[index] if weighting == "own" else 0.0)
    return {
        "nll_vlb_bpd": nll,
        "nll_ode_bpd": nll - 1,
        "fd_digits": float(FD[arm][index]),
        "val/vlb_bpd": nll,
    }


def error_profile(arm: str) -> list[float]:
    """ε-MSE per t that falls where the arm's weight rises relative to eps_simple's, except
    score_elbo, whose error rises with its weight (claim 4 fails for it)."""
    schedule = NoiseSchedule("linear", 1000)
    t = np.array(PROFILE_T)
    head, weighting = ARM_PARTS[arm]
    ratio = np.ones(len(t))
    keep = t >= 2
    steps = torch.from_numpy(t[keep])
    ratio[keep] = (
        WEIGHTINGS[weighting].eps_weight(HEADS[head], schedule, steps, "small").numpy()
        / WEIGHTINGS["eps"].eps_weight(HEADS["eps"], schedule, steps, "small").numpy()
    )
    exponent = 0.3 if arm == "score_elbo" else -0.3
    return (0.1 * ratio**exponent).tolist()


def write_config(directory: Path, arm: str, seed: int, num_timesteps: int = 1000) -> None:
    directory.mkdir(parents=True)
    head, weighting = ARM_PARTS[arm]
    config = {
        "experiment": arm,
        "objective": {"head": head, "weighting": weighting},
        "seed": seed,
        "profile": "default",
        "data": {"name": "digits", "batch_size": 128},
        "model": {"name": "unet_small"},
        "trainer": {"max_steps": 100},
        "diffusion": {"schedule": "linear", "num_timesteps": num_timesteps, "variance": "small"},
    }
    RunDir(directory).write_config(OmegaConf.create(config))


def write_run(root: Path, arm: str, seed: int) -> Path:
    directory = root / "trials" / "default-digits" / arm / f"s{seed}-0000"
    write_config(directory, arm, seed)
    head, weighting = ARM_PARTS[arm]
    results = {
        "status": "complete",
        "experiment": arm,
        "arm": arm,
        "head": head,
        "weighting": weighting,
        "seed": seed,
        "profile": "default",
        "data": "digits",
        "steps": 100,
        "metrics": arm_metrics(arm, SEEDS.index(seed)),
        "evaluation": {
            "nll_vlb_settings": {"timesteps": "stratified-50", "num_images": 359, "wall_time_s": 1.0},
            "sample_settings": {"sampler": "ddim", "steps": 50, "num_samples": 1000},
        },
    }
    run_dir = RunDir(directory)
    run_dir.write_results(results)
    run_dir.write_curve(EPS_MSE_BY_T, PROFILE_T, error_profile(arm))
    run_dir.write_curve(VLB_TERMS, [1, 500, 1000], [2.0, 0.01, 0.001])
    metrics = ["step,val/vlb_bpd,val/eps_mse", "50,5.0,", "50,,0.2", "100,4.0,0.1"]
    (directory / "metrics.csv").write_text("\n".join(metrics) + "\n")
    if seed == 0:
        grid = np.random.default_rng(seed).random((16, 16))
        plt.imsave(directory / "samples_ddim.png", grid, cmap="gray")
        plt.imsave(directory / "x0_trajectory.png", grid.T, cmap="gray")
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Six arms x three seeds, plus a half-written, an unfinished and an unreadable run."""
    root = tmp_path_factory.mktemp("runs")
    for arm in ARMS:
        for seed in SEEDS:
            write_run(root, arm, seed)
    broken = root / "trials" / "default-digits" / "eps_simple" / "s9-half"
    write_config(broken, "eps_simple", 9)
    (broken / "results.json").write_text('{"status": "comp')
    write_config(root / "trials" / "default-digits" / "x0_elbo" / "s8-unfinished", "x0_elbo", 8)
    garbled = root / "eps_elbo" / "garbled"
    garbled.mkdir(parents=True)
    (garbled / "config.yaml").write_text("experiment: [unclosed\n")
    assert report_cli.main(["--runs", str(root)]) == 0
    out = root / "report" / GROUP
    return out, json.loads((out / "report.json").read_text())


def test_table_numbers_and_paired_intervals(built: tuple[Path, dict]) -> None:
    _, payload = built
    table = payload["table"]
    assert set(table) == set(ARMS)
    fd = table["eps_simple"]["fd_digits"]["value"]
    assert (fd["mean"], fd["n"]) == (11.0, 3)
    assert fd["low"] == pytest.approx(9 + LOW_123) and fd["high"] == pytest.approx(9 + HIGH_123)
    assert table["eps_simple"]["fd_digits"]["diff"] is None
    # eps_elbo − eps_simple = −(0.3 + 0.1 k): the interval of 0.1 k mirrored and shifted.
    diff = table["eps_elbo"]["nll_vlb_bpd"]["diff"]
    assert diff["mean"] == pytest.approx(-0.5)
    assert diff["low"] == pytest.approx(-0.3 - 0.1 * HIGH_123)
    assert diff["high"] == pytest.approx(-0.3 - 0.1 * LOW_123)
    assert payload["metrics"] == ["nll_vlb_bpd", "nll_ode_bpd", "fd_digits", "val/vlb_bpd"]
    assert payload["quality_metric"] == "fd_digits"


def parts_by_label(claim: dict, metric: str) -> dict[str, dict]:
    return {p["label"]: p for p in claim["parts"] if p["metric"] == metric}


def test_verdicts_including_failing_claims(built: tuple[Path, dict]) -> None:
    _, payload = built
    claims = {c["number"]: c for c in payload["claims"]}
    assert [claims[n]["verdict"] for n in (1, 2, 3, 4)] == [HOLDS, FAILS, FAILS, FAILS]
    assert all(p["verdict"] == HOLDS for p in claims[1]["parts"]) and len(claims[1]["parts"]) == 6
    quality = parts_by_label(claims[2], "fd_digits")
    assert quality["eps_simple − eps_elbo"]["verdict"] == HOLDS
    assert quality["score_simple − score_elbo"]["verdict"] == HOLDS
    x0 = quality["x0_simple − x0_elbo"]
    assert x0["verdict"] == FAILS and x0["interval"]["mean"] == pytest.approx(22.0)
    assert x0["interval"]["low"] == pytest.approx(16 + 3 * LOW_123)
    equivalence = parts_by_label(claims[3], "nll_vlb_bpd")
    pair = equivalence["eps_elbo − x0_elbo"]
    assert pair["verdict"] == HOLDS
    assert pair["interval"]["low"] == pytest.approx(0.1 * (LOW_123 - 2))
    assert equivalence["(elbo − simple) of eps − the same of x0"]["interval"]["high"] == pytest.approx(0)
    effects = parts_by_label(claims[3], "fd_digits")
    assert effects["(elbo − simple) of eps − the same of x0"]["verdict"] == FAILS
    assert effects["eps_elbo − score_elbo"]["verdict"] == HOLDS
    snr = {p["label"].split()[0]: p for p in claims[4]["parts"]}
    assert set(snr) == set(ARMS) - {"eps_simple"}
    for arm, part in snr.items():
        expected = 1.0 if arm == "score_elbo" else -1.0
        assert part["interval"]["mean"] == pytest.approx(expected)
        assert part["verdict"] == (FAILS if arm == "score_elbo" else HOLDS)


def test_incomplete_runs_are_listed_not_fatal(built: tuple[Path, dict]) -> None:
    out, payload = built
    reasons = {Path(i["directory"]).name: i["reason"] for i in payload["incomplete"]}
    assert set(reasons) == {"s9-half", "s8-unfinished", "garbled"}
    assert "unreadable" in reasons["s9-half"]
    assert "no results.json" in reasons["s8-unfinished"]
    assert payload["runs"] == 18
    page = (out / "report.html").read_text()
    assert "Incomplete runs" in page and "s9-half" in page and "garbled" in page


def test_files_figures_and_settings(built: tuple[Path, dict]) -> None:
    out, payload = built
    expected = {
        "implied_weights.png",
        "vlb_terms.png",
        "eps_mse_by_t.png",
        "paired_differences.png",
        "training_curves.png",
        "samples.png",
    }
    assert set(payload["figures"]) == expected
    page = (out / "report.html").read_text()
    summary = (out / "report.md").read_text()
    for name in expected:
        assert (out / "figures" / name).stat().st_size > 1000
        assert f"figures/{name}" in page and f"](figures/{name})" in summary
    assert page.count("src='data:image/png;base64,") == len(expected)
    assert not list(out.rglob("*.tmp*"))
    settings = payload["settings"]
    assert settings["data"] == ["digits"] and settings["training steps"] == ["100"]
    assert '"sampler": "ddim"' in settings["sample_settings"][0]
    assert "**Claim 2: fails" in summary


def test_missing_runs_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report_cli.main(["--runs", str(tmp_path / "nowhere")]) == 2
    assert "make sweep OBJ=all" in capsys.readouterr().err
    assert report_cli.main(["--runs", str(tmp_path)]) == 2
    assert "found no run directories" in capsys.readouterr().err


def chromium() -> str:
    """Debian's Chromium; CI installs it (.ci/run), so there a missing browser is a failure."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: apt-get install chromium (.ci/run does this)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def test_page_renders_in_headless_chromium(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = built
    browser = chromium()
    url = (out / "report.html").resolve().as_uri()
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert "Claim 4: fails" in dom.stdout and dom.stdout.count("<img") == 6
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1200,1600", f"--screenshot={shot}", url], capture_output=True, timeout=120
    )
    pixels = plt.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 0.05 and (pixels.mean(axis=2) < 0.5).mean() > 0.005


def test_equivalence_uses_the_distance_to_eps_star_when_present() -> None:
    values = {
        arm: {"eps_star_mse": {s: 0.02 + (0.01 if arm == "x0_elbo" else 0.0) + 0.001 * s for s in SEEDS}}
        for arm in ARMS
    }
    parts = {p.label: p for p in claim_equivalence(values).parts}
    assert {p.metric for p in parts.values()} == {"eps_star_mse"} and len(parts) == 6
    assert parts["eps_elbo − score_elbo"].verdict == HOLDS
    assert parts["eps_elbo − x0_elbo"].verdict == FAILS
    assert parts["eps_elbo − x0_elbo"].interval.mean == pytest.approx(-0.01)


def test_a_missing_head_leaves_a_claim_inconclusive() -> None:
    values = {
        arm: {"nll_vlb_bpd": {s: 3.0 + (arm.endswith("simple")) + 0.1 * s for s in SEEDS}} for arm in ARMS
    }
    assert claim_elbo_likelihood(values).verdict == HOLDS
    del values["score_elbo"]
    claim = claim_elbo_likelihood(values)
    assert [p.metric for p in claim.parts] == ["nll_vlb_bpd"] * 3
    assert claim.verdict == INCONCLUSIVE


def test_bad_values_are_left_out_and_processes_are_not_mixed(tmp_path: Path) -> None:
    good = write_run(tmp_path, "eps_simple", 0)
    results = json.loads((good / "results.json").read_text())
    results["metrics"].update({"nll_ode_bpd": math.inf, "fd_digits": None, "nested": {"a": 1}})
    (good / "results.json").write_text(json.dumps(results))
    run = load_run(good)
    assert sorted(run.dropped) == ["fd_digits", "nested", "nll_ode_bpd"]
    assert set(run.metrics) == {"nll_vlb_bpd", "val/vlb_bpd"}
    bad_seed = tmp_path / "x0_simple" / "s1"
    write_config(bad_seed, "x0_simple", 1)
    (bad_seed / "results.json").write_text(json.dumps({**results, "seed": "one"}))
    assert "seed" in load_run(bad_seed).reason
    short = tmp_path / "eps_simple" / "short-T"
    write_config(short, "eps_simple", 0, num_timesteps=100)
    reevaluated = {"status": "complete", "metrics": {"nll_vlb_bpd": 2.0}}
    (short / "results.json").write_text(json.dumps(reevaluated))
    rows = ["t,eps_mse", *(f"{t},0.1" for t in (1, 2, 50, 100))]
    (short / "eps_mse_by_t.csv").write_text("\n".join(rows) + "\n")
    assert report_cli.main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    groups = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert groups == [GROUP, "default-digits-100steps-linear-T100-small"]
    page = (tmp_path / "out" / GROUP / "report.html").read_text()
    assert "not finite numbers" in page and "nll_ode_bpd" in page
    assert "no usable seed" in page


class FakeRun:
    def __init__(self, id: str, state: str, seed: int | None, created: str, nll: float) -> None:
        self.id, self.state, self.created_at = id, state, created
        self.config = {
            "experiment": "eps_simple",
            "objective": {"head": "eps", "weighting": "own"},
            "seed": seed,
            "profile": "default",
            "data": {"name": "digits"},
            "trainer": {"max_steps": 100},
            "eval": {"sampler": "ddim"},
        }
        self.summary = {"final/nll_vlb_bpd": nll, "train/loss": 0.1}


class FakeApi:
    def runs(self, path: str) -> list[FakeRun]:
        assert path == "team/diffbench"
        return [
            FakeRun("a", "finished", 0, "2026-01-01T00:00:00Z", 4.0),
            FakeRun("b", "finished", 0, "2026-01-02T00:00:00Z", 3.5),
            FakeRun("c", "crashed", 1, "2026-01-03T00:00:00Z", 9.0),
            FakeRun("d", "finished", None, "2026-01-03T00:00:00Z", 9.0),
        ]


def test_wandb_source_keeps_the_newest_finished_run_and_lists_the_rest() -> None:
    runs, incomplete = from_wandb("team/diffbench", api=FakeApi())
    (run,) = runs
    assert (run.metrics, run.seed, run.group) == ({"nll_vlb_bpd": 3.5}, 0, GROUP)
    reasons = {str(item.directory): item.reason for item in incomplete}
    assert reasons == {
        "wandb:team/diffbench/c": "W&B state crashed",
        "wandb:team/diffbench/d": "no final metrics or config",
    }
    assert report.settings_summary(runs)["evaluation config"] == ['{"sampler": "ddim"}']
