"""The report from synthetic run directories whose numbers and verdicts are worked out by hand:
paired t-intervals, directional claims that hold, are contradicted or are not shown, TOST,
verdicts along the budget, a smoke group with no verdict, groups that refuse to pool different
learning rates, broken runs, and a real headless browser."""

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
from scipy import stats

from diffbench.analysis.claims import arm_for, claim_likelihood, elbo_identity, low_snr_share
from diffbench.analysis.collect import ARM_PARTS, config_group, from_wandb, load_run, scan
from diffbench.analysis.inference import CONTRADICTED, HOLDS, NOT_SHOWN, UNDETERMINED
from diffbench.cli import report as report_cli
from diffbench.core.diffusion import NoiseSchedule
from diffbench.rundir import EPS_MSE_BY_T, VLB_TERMS, RunDir

SEEDS = (0, 1, 2)
PROFILE_T = [1, 2, 5, 10, 50, 100, 500, 1000]
# Eight arms: the six presets plus x0 and score under the eps weighting (DDPM's L_simple).
ARMS = ("eps_simple", "eps_elbo", "x0_simple", "x0_elbo", "x0_eps", "score_simple", "score_elbo", "score_eps")
# NLL: every non-ELBO arm is worse than its head's ELBO arm by GAP (0.4, 0.5, 0.6 per seed), so
# Δ = −GAP: mean −0.5, sd 0.1, t = −8.66 on 2 df, one-sided p = 0.0065 < 0.05/3 for every head.
ELBO_NLL = {"eps": [3.7, 3.8, 3.6], "x0": [3.8, 3.7, 3.6], "score": [3.6, 3.8, 3.7]}
GAP = [0.4, 0.5, 0.6]
# FD: eps weighting beats the ELBO on eps (Δ −10, −11, −12) and x0 (Δ −6 each seed) but loses on
# score (Δ +10, +11, +12), whose opposite-direction test passes Holm: claim 2 is contradicted.
FD = {
    "eps_simple": [10, 11, 12],
    "eps_elbo": [20, 22, 24],
    "x0_simple": [40, 44, 48],
    "x0_elbo": [21, 22, 23],
    "x0_eps": [15, 16, 17],
    "score_simple": [12, 13, 14],
    "score_elbo": [20, 22, 24],
    "score_eps": [30, 33, 36],
}
BUDGETS = (50, 100)


def arm_metrics(arm: str, index: int) -> dict[str, float]:
    head, weighting = ARM_PARTS[arm]
    nll = ELBO_NLL[head][index] + (GAP[index] if weighting != "elbo" else 0.0)
    return {
        "nll_vlb_bpd": nll,
        "nll_ode_bpd": nll - 1,
        "fd_digits": float(FD[arm][index]),
        "val/vlb_bpd": nll,
    }


def budget_rows(arm: str, index: int) -> list[dict]:
    """At 50 steps the ELBO arms are still worse in validation VLB (by 0.2 + 0.05 k); at 100 they
    are better (the final NLL): claim 1's verdict changes between the last two budgets."""
    head, weighting = ARM_PARTS[arm]
    final = arm_metrics(arm, index)
    early = final["nll_vlb_bpd"] + 1 + (0.2 + 0.05 * index + GAP[index] if weighting == "elbo" else 0.0)
    return [
        {"step": 50, "val_vlb_bpd": early, "fd_digits": final["fd_digits"] * 2, "wall_time_s": 1.0},
        {
            "step": 100,
            "val_vlb_bpd": final["nll_vlb_bpd"],
            "fd_digits": final["fd_digits"],
            "wall_time_s": 1.0,
        },
    ]


def error_profile(arm: str) -> list[float]:
    return [0.1 * (1 + 0.1 * ARMS.index(arm)) / math.sqrt(t) for t in PROFILE_T]


def write_config(
    directory: Path,
    arm: str,
    seed: int,
    num_timesteps: int = 1000,
    profile: str = "default",
    lr: float = 1e-3,
) -> None:
    directory.mkdir(parents=True)
    head, weighting = ARM_PARTS[arm]
    config = {
        "experiment": arm,
        "objective": {"head": head, "weighting": weighting, "name": head},
        "seed": seed,
        "profile": profile,
        "data": {"name": "digits", "batch_size": 128},
        "model": {"name": "unet_small"},
        "optim": {"lr": lr},
        "trainer": {"max_steps": 100, "gradient_clip_val": None},
        "diffusion": {"schedule": "linear", "num_timesteps": num_timesteps, "variance": "small"},
        "run": {"root": "anywhere"},
        "report": {"margins": {"nll_vlb_bpd": 0.05}},
    }
    RunDir(directory).write_config(OmegaConf.create(config))


def write_run(root: Path, arm: str, seed: int, profile: str = "default", lr: float = 1e-3) -> Path:
    directory = root / "trials" / f"{profile}-digits" / arm / f"s{seed}-{lr:g}"
    write_config(directory, arm, seed, profile=profile, lr=lr)
    head, weighting = ARM_PARTS[arm]
    index = SEEDS.index(seed)
    results = {
        "status": "complete",
        "experiment": arm,
        "arm": arm,
        "head": head,
        "weighting": weighting,
        "seed": seed,
        "profile": profile,
        "data": "digits",
        "steps": 100,
        "metrics": arm_metrics(arm, index),
        "budgets": budget_rows(arm, index),
        "optimisation": {"gradient_clip_val": None, "clipped_fraction": 0.0, "grad_norm_median": 1.5},
        "evaluation": {
            "nll_vlb_settings": {"timesteps": "stratified-2", "num_images": 359, "wall_time_s": 1.0},
            "sample_settings": {
                "sampler": "ddim",
                "steps": 50,
                "num_samples": 1000,
                "evaluation_noise": {"half_size": 500, "fd_digits": [10.0 + seed, 10.5 + 2 * seed]},
            },
            "baselines": {"histogram_nll_bpd": 2.4 + 0.01 * seed, "fd_digits_real_vs_real": 1.0},
        },
    }
    run_dir = RunDir(directory)
    run_dir.write_results(results)
    run_dir.write_curve(EPS_MSE_BY_T, PROFILE_T, error_profile(arm))
    # A stratified-2 estimate: the decoder, then one t in each half of 1..1000 (weights 1, 499, 500).
    extra = 0.0 if weighting == "elbo" else 0.001 * (1 + index)
    run_dir.write_curve(VLB_TERMS, [1, 300, 800], [2.0, 0.01 + extra, 0.001])
    metrics = ["step,val/vlb_bpd,val/eps_mse", "50,5.0,", "50,,0.2", "100,4.0,0.1"]
    (directory / "metrics.csv").write_text("\n".join(metrics) + "\n")
    if seed == 0:
        grid = np.random.default_rng(seed).random((16, 16))
        plt.imsave(directory / "samples_ddim.png", grid, cmap="gray")
        plt.imsave(directory / "x0_trajectory.png", grid.T, cmap="gray")
    return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """Eight arms x three seeds, plus a half-written, an unfinished and an unreadable run."""
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
    (group,) = [p.name for p in (root / "report").iterdir() if p.is_dir()]
    out = root / "report" / group
    return out, json.loads((out / "report.json").read_text()), group


def test_table_numbers_and_paired_t_intervals(built: tuple[Path, dict, str]) -> None:
    _, payload, _ = built
    table = payload["table"]
    assert list(table) == [a for a in ARM_PARTS if a in ARMS] and payload["reference"] == "eps_simple"
    assert table["eps_simple"]["fd_digits"]["seeds"] == {"0": 10.0, "1": 11.0, "2": 12.0}
    assert "delta" not in table["eps_simple"]["fd_digits"]
    # eps_elbo − eps_simple in NLL = −GAP: mean −0.5 ± t_{0.975, 2} · 0.1 / √3.
    delta = table["eps_elbo"]["nll_vlb_bpd"]["delta"]
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert delta["mean"] == pytest.approx(-0.5)
    assert delta["interval"] == pytest.approx([-0.5 - half, -0.5 + half])
    assert delta["relative"] == pytest.approx(-0.5 / np.mean([3.7 + 0.4, 3.8 + 0.5, 3.6 + 0.6]))
    assert delta["p_less"] == pytest.approx(
        stats.ttest_rel([3.7, 3.8, 3.6], [4.1, 4.3, 4.2], alternative="less").pvalue
    )
    assert delta["mde"] > 0 and delta["bootstrap"] is None and delta["permutation_p_less"] is None
    assert set(payload["metrics"]) == {"nll_vlb_bpd", "nll_ode_bpd", "fd_digits", "val/vlb_bpd"}


def claims_of(payload: dict) -> dict[int, dict]:
    return {c["number"]: c for c in payload["claims"]}


def test_likelihood_holds_on_every_head(built: tuple[Path, dict, str]) -> None:
    claim = claims_of(built[1])[1]
    primary = next(t for t in claim["tests"] if t["primary"])
    assert (primary["title"], primary["metric"], claim["verdict"]) == ("elbo < eps", "nll_vlb_bpd", HOLDS)
    labels = [p["label"] for p in primary["parts"]]
    assert labels == ["eps_elbo − eps_simple", "x0_elbo − x0_eps", "score_elbo − score_eps"]
    assert all(p["verdict"] == HOLDS for p in primary["parts"])
    secondary = {(t["title"], t["metric"]) for t in claim["tests"] if not t["primary"]}
    assert ("elbo < own", "nll_vlb_bpd") in secondary and ("elbo < eps", "nll_ode_bpd") in secondary


def test_samples_claim_is_contradicted_by_one_head(built: tuple[Path, dict, str]) -> None:
    claim = claims_of(built[1])[2]
    primary = next(t for t in claim["tests"] if t["primary"])
    verdicts = {p["label"]: p["verdict"] for p in primary["parts"]}
    assert verdicts == {
        "eps_simple − eps_elbo": HOLDS,
        "x0_eps − x0_elbo": HOLDS,
        "score_eps − score_elbo": CONTRADICTED,
    }
    assert claim["verdict"] == CONTRADICTED


def test_equivalence_is_tost_and_the_identity_is_numeric(built: tuple[Path, dict, str]) -> None:
    claim = claims_of(built[1])[3]
    assert any("same objective" in fact for fact in claim["facts"])
    assert elbo_identity() < 1e-9
    elbo = next(
        t
        for t in claim["tests"]
        if t["title"] == "(c) same dynamics under elbo" and t["metric"] == "nll_vlb_bpd"
    )
    # The heads' ELBO NLLs differ by about 0.1 per seed: a 90% interval far wider than ±0.05.
    assert elbo["margin"] == 0.05 and elbo["verdict"] == UNDETERMINED and len(elbo["parts"]) == 3


def test_snr_trend_within_a_head(built: tuple[Path, dict, str]) -> None:
    """On x0: order its three weightings by low-SNR share (computed here independently), then
    Kendall's τ of FD along that order is the same every seed."""
    claim = claims_of(built[1])[4]
    schedule = NoiseSchedule("linear", 1000)
    t = np.arange(1, 1001)
    alpha_bar = schedule.alphas_cumprod[1:].numpy()
    log_snr = np.log(alpha_bar / (1 - alpha_bar))
    by_hand = {"x0_eps": np.ones(1000), "x0_simple": (1 - alpha_bar) / alpha_bar}
    for arm, weight in by_hand.items():
        share = weight[log_snr < 0].sum() / weight.sum()
        head, weighting = ARM_PARTS[arm]
        assert low_snr_share(head, weighting, schedule, "small") == pytest.approx(share, rel=1e-9)
    shares = {a: low_snr_share(*ARM_PARTS[a], schedule, "small") for a in ("x0_elbo", "x0_eps", "x0_simple")}
    order = sorted(shares, key=shares.__getitem__)
    assert order == ["x0_elbo", "x0_eps", "x0_simple"] and t[-1] == 1000
    tau = stats.kendalltau([shares[a] for a in order], [FD[a][0] for a in order]).statistic
    fd = next(
        test for test in claim["tests"] if test["title"].startswith("x0") and test["metric"] == "fd_digits"
    )
    assert fd["parts"][0]["mean"] == pytest.approx(tau)
    # τ is the same every seed; the exact sign-flip test's smallest p at n = 3 is 1/8, not 0.
    assert fd["parts"][0]["permutation_p_less" if tau < 0 else "permutation_p_greater"] == pytest.approx(
        1 / 8
    )
    assert fd["verdict"] == NOT_SHOWN
    nll = next(
        test for test in claim["tests"] if test["title"].startswith("x0") and test["metric"] == "nll_vlb_bpd"
    )
    assert nll["verdict"] == NOT_SHOWN


def test_verdicts_along_the_budget_flag_a_change(built: tuple[Path, dict, str]) -> None:
    out, payload, _ = built
    verdicts = payload["budget_verdicts"]
    assert verdicts["50"]["1"] == CONTRADICTED and verdicts["100"]["1"] == HOLDS
    page = (out / "report.md").read_text()
    assert "Claim 1's verdict changed between the last two budgets" in page
    assert "moving" in page and "budget_curves.png" in payload["figures"]


def test_baselines_optimisation_and_bands_are_shown(built: tuple[Path, dict, str]) -> None:
    out, _, _ = built
    page = (out / "report.md").read_text()
    assert "histogram_nll_bpd" in page and "2.41 ± 0.01 (n=3)" in page
    assert "## Optimisation" in page and "grad_norm_median" in page
    # Non-ELBO arms' term at t = 300 (log SNR ≈ −0.3) is larger by 0.001 (1 + k), standing for 499 terms.
    bands = page.split("## Where the likelihood is lost")[1]
    assert "| eps_elbo | Δ 0 [0, 0]" in bands and "Δ -0.998 [" in bands.split("| x0_elbo |")[1]
    noise = page.split("## Evaluation noise")[1].split("\n## ")[0]
    assert "| eps_simple | fd_digits | 500 | 1.5 |" in noise  # |a − b| = 0.5, 1.5, 2.5 over the seeds


def test_incomplete_runs_are_listed_not_fatal(built: tuple[Path, dict, str]) -> None:
    out, payload, _ = built
    reasons = {Path(i["directory"]).name: i["reason"] for i in payload["incomplete"]}
    assert {"s9-half", "s8-unfinished"} <= set(reasons)
    assert "unreadable" in reasons["s9-half"] and "no results.json" in reasons["s8-unfinished"]
    assert payload["runs"] == 24
    page = (out / "report.html").read_text()
    assert "Incomplete runs" in page and "s9-half" in page


def test_files_figures_and_settings(built: tuple[Path, dict, str]) -> None:
    out, payload, _ = built
    expected = {
        "implied_weights.png",
        "budget_curves.png",
        "nll_vs_quality.png",
        "vlb_terms.png",
        "eps_mse_by_t.png",
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
    assert "`optim.lr`: 0.001" in summary and "`trainer.gradient_clip_val`: null" in summary
    assert "Claim 2: contradicted" in summary


def test_smoke_group_prints_no_verdict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for arm in ("eps_simple", "eps_elbo"):
        for seed in SEEDS:
            write_run(tmp_path, arm, seed, profile="smoke")
    assert report_cli.main(["--runs", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    (group,) = [p for p in (tmp_path / "report").iterdir() if p.is_dir()]
    payload = json.loads((group / "report.json").read_text())
    assert payload["plumbing"] and payload["claims"] == [] and payload["budget_verdicts"] is None
    page = (group / "report.md").read_text()
    assert "plumbing check: no verdict" in page and "plumbing check: no verdict" in printed
    for word in (HOLDS, CONTRADICTED, NOT_SHOWN, UNDETERMINED):
        assert word not in page and word not in printed


def test_runs_at_different_learning_rates_are_not_pooled(tmp_path: Path) -> None:
    for lr in (1e-3, 3e-3):
        write_run(tmp_path, "eps_simple", 0, lr=lr)
    runs, _ = scan(tmp_path)
    assert len({run.group for run in runs}) == 2
    same = [load_run(d) for d in sorted((tmp_path / "trials").rglob("s0-*"))]
    config = dict(same[0].config)
    assert (
        config_group({**config, "seed": 5, "objective": {"head": "x0", "weighting": "elbo"}}) == same[0].group
    )
    assert config_group({**config, "optim": {"lr": 0.1}}) != same[0].group


def test_a_missing_head_leaves_the_claim_not_shown() -> None:
    values = {
        arm: {"nll_vlb_bpd": {s: 3.0 + (ARM_PARTS[arm][1] != "elbo") + 0.1 * s for s in SEEDS}}
        for arm in ("eps_simple", "eps_elbo", "x0_elbo", "x0_eps", "score_elbo")
    }
    claim = claim_likelihood(values, ("nll_vlb_bpd",), ["eps", "x0", "score"])
    primary = claim.tests[0]
    assert primary.part_verdicts == [HOLDS, HOLDS, NOT_SHOWN] and claim.verdict == NOT_SHOWN
    assert arm_for(values, "eps", "eps") == "eps_simple" and arm_for(values, "x0", "own") == "x0_simple"


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


def test_page_renders_in_headless_chromium(built: tuple[Path, dict, str], tmp_path: Path) -> None:
    out, payload, _ = built
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
    assert "Claim 2: contradicted" in dom.stdout and dom.stdout.count("<img") == len(payload["figures"])
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1200,1600", f"--screenshot={shot}", url], capture_output=True, timeout=120
    )
    pixels = plt.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 0.05 and (pixels.mean(axis=2) < 0.5).mean() > 0.005


def test_bad_values_are_left_out(tmp_path: Path) -> None:
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
    assert report_cli.main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    (page,) = (tmp_path / "out").rglob("report.html")
    text = page.read_text()
    assert "not finite numbers" in text and "nll_ode_bpd" in text and "no usable seed" in text


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
    assert (run.metrics, run.seed, run.arm) == ({"nll_vlb_bpd": 3.5}, 0, "eps_simple")
    assert run.group.startswith("default-digits-100steps-")
    reasons = {str(item.directory): item.reason for item in incomplete}
    assert reasons == {
        "wandb:team/diffbench/c": "W&B state crashed",
        "wandb:team/diffbench/d": "no final metrics or config",
    }
    assert torch.isfinite(torch.tensor(run.metrics["nll_vlb_bpd"]))


def test_learning_rate_check_says_whether_the_ranking_changes(tmp_path: Path) -> None:
    """Two learning rates, one seed: at 1e-3 eps_elbo has the lower NLL, at 3e-3 the ranking is
    turned around by lowering eps_simple's NLL below it."""
    for lr in (1e-3, 3e-3):
        for arm in ("eps_simple", "eps_elbo"):
            directory = write_run(tmp_path, arm, 0, lr=lr)
            if lr == 3e-3 and arm == "eps_simple":
                results = json.loads((directory / "results.json").read_text())
                results["metrics"]["nll_vlb_bpd"] = 1.0
                (directory / "results.json").write_text(json.dumps(results))
    assert report_cli.main(["--runs", str(tmp_path)]) == 0
    check = (tmp_path / "report" / "lr_check.md").read_text()
    section = check.split("## nll_vlb_bpd ranking across optim.lr")[1].split("##")[0]
    assert (
        "The ranking changes with optim.lr" in section and "τ between the first and last = -1.00" in section
    )
    assert "| eps_elbo | 1 | 2 |" in section and "| eps_simple | 2 | 1 |" in section
    assert "The ranking does not change" in check.split("## fd_digits ranking across optim.lr")[1]
