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
from scipy import stats

from diffbench.analysis.claims import (
    claim_likelihood,
    elbo_identity,
    final_metric_set,
    find,
    low_snr_share,
)
from diffbench.analysis.collect import config_group, from_wandb, load_run, scan
from diffbench.analysis.summary import summarize_trials
from diffbench.analysis.verdicts import Verdict
from diffbench.cli import report as report_cli
from diffbench.core.arms import Arm
from diffbench.core.diffusion import NoiseSchedule
from diffbench.rundir import EPS_MSE_BY_T, VLB_TERMS, RunDir
from fabricate import write_config
from fabricate import write_run as write_fabricated

SEEDS = (0, 1, 2)
PROFILE_T = [1, 2, 5, 10, 50, 100, 500, 1000]
# Eight arms: the six presets plus x0 and score under the eps weighting (DDPM's L_simple).
ARMS = tuple(
    Arm.parse(label)
    for label in (
        "eps_simple",
        "eps_elbo",
        "x0_simple",
        "x0_elbo",
        "x0_eps",
        "score_simple",
        "score_elbo",
        "score_eps",
    )
)
# NLL: every non-ELBO arm is worse than its head's ELBO arm by GAP (0.4, 0.5, 0.6 per seed), so
# Δ = −GAP: mean −0.5, sd 0.1, t = −8.66 on 2 df, one-sided p = 0.0065 < 0.05/3 for every head.
ELBO_NLL = {"eps": [3.7, 3.8, 3.6], "x0": [3.8, 3.7, 3.6], "score": [3.6, 3.8, 3.7]}
GAP = [0.4, 0.5, 0.6]
# FD: eps weighting beats the ELBO on eps (Δ −10, −11, −12) and on x0 by exactly 6 every seed (no
# spread: the exact sign-flip p is 1/8, not the t-test's 0) but loses on score (Δ +10, +11, +12),
# whose opposite-direction test passes Holm: claim 2 is contradicted.
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


def arm_metrics(arm: Arm, index: int) -> dict[str, float]:
    nll = ELBO_NLL[arm.head][index] + (GAP[index] if arm.weighting != "elbo" else 0.0)
    return {
        "nll_vlb_bpd": nll,
        "nll_ode_bpd": nll - 1,
        "fd_digits": float(FD[arm.label][index]),
        "fd_digits@ddim-10": float(FD[arm.label][index]) + 5.0,
        "val/vlb_bpd": nll,
    }


def budget_rows(arm: Arm, index: int) -> list[dict]:
    """At 50 steps the ELBO arms are still worse in validation VLB (by 0.2 + 0.05 k); at 100 they
    are better (the final NLL): claim 1's verdict changes between the last two budgets."""
    final = arm_metrics(arm, index)
    early = final["nll_vlb_bpd"] + 1 + (0.2 + 0.05 * index + GAP[index] if arm.weighting == "elbo" else 0.0)
    return [
        {"step": 50, "val_vlb_bpd": early, "fd_digits": final["fd_digits"] * 2, "wall_time_s": 1.0},
        {
            "step": 100,
            "val_vlb_bpd": final["nll_vlb_bpd"],
            "fd_digits": final["fd_digits"],
            "wall_time_s": 1.0,
        },
    ]


def error_profile(arm: Arm) -> list[float]:
    return [0.1 * (1 + 0.1 * ARMS.index(arm)) / math.sqrt(t) for t in PROFILE_T]


def write_run(root: Path, arm: Arm, seed: int, profile: str = "default", lr: float = 1e-3) -> Path:
    index = SEEDS.index(seed)
    extra = {
        "optimisation": {"gradient_clip_val": None, "clipped_fraction": 0.0, "grad_norm_median": 1.5},
        "evaluation": {
            "nll_vlb_settings": {"timesteps": "stratified-2", "num_images": 359, "wall_time_s": 1.0},
            "sample_settings": {
                "sampler": "ddim",
                "steps": 50,
                "num_samples": 1000,
                "evaluation_noise": {"half_size": 500, "fd_digits": [10.0 + seed, 10.5 + 2 * seed]},
            },
            "sample_settings@ddim-10": {"sampler": "ddim", "steps": 10, "eta": 0.0},
            "baselines": {"histogram_nll_bpd": 2.4 + 0.01 * seed, "fd_digits_real_vs_real": 1.0},
        },
    }
    name = f"s{seed}-{lr:g}"
    directory = write_fabricated(
        root, arm, seed, arm_metrics(arm, index), budget_rows(arm, index), name, extra, profile=profile, lr=lr
    )
    run_dir = RunDir(directory)
    run_dir.write_curve(EPS_MSE_BY_T, PROFILE_T, error_profile(arm))
    # A stratified-2 estimate: the decoder, then one t in each half of 1..1000 (weights 1, 499, 500).
    extra_term = 0.0 if arm.weighting == "elbo" else 0.001 * (1 + index)
    run_dir.write_curve(VLB_TERMS, [1, 300, 800], [2.0, 0.01 + extra_term, 0.001])
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
    write_config(broken, Arm("eps", "own"), 9)
    (broken / "results.json").write_text('{"status": "comp')
    write_config(root / "trials" / "default-digits" / "x0_elbo" / "s8-unfinished", Arm("x0", "elbo"), 8)
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
    assert list(table) == [a.label for a in sorted(ARMS, key=lambda a: a.order)]
    assert payload["reference"] == "eps_simple"
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
    assert set(payload["metrics"]) == {
        "nll_vlb_bpd",
        "nll_ode_bpd",
        "fd_digits",
        "fd_digits@ddim-10",
        "val/vlb_bpd",
    }


def claims_of(payload: dict) -> dict[int, dict]:
    return {c["number"]: c for c in payload["claims"]}


def test_likelihood_holds_on_every_head(built: tuple[Path, dict, str]) -> None:
    claim = claims_of(built[1])[1]
    primary = next(t for t in claim["tests"] if t["primary"])
    assert (primary["title"], primary["metric"], claim["verdict"]) == (
        "elbo < eps",
        "nll_vlb_bpd",
        Verdict.HOLDS,
    )
    labels = [p["label"] for p in primary["parts"]]
    assert labels == ["eps_elbo − eps_simple", "x0_elbo − x0_eps", "score_elbo − score_eps"]
    assert all(p["verdict"] == Verdict.HOLDS for p in primary["parts"])
    assert claim["headline"] == "holds on eps, x0 and score"
    secondary = {(t["title"], t["metric"]) for t in claim["tests"] if not t["primary"]}
    assert ("elbo < own", "nll_vlb_bpd") in secondary and ("elbo < eps", "nll_ode_bpd") in secondary
    # The eps head's own MSE is its eps weighting: "elbo < own" does not repeat that pair.
    own = next(t for t in claim["tests"] if t["title"] == "elbo < own" and t["metric"] == "nll_vlb_bpd")
    assert [p["head"] for p in own["parts"]] == ["x0", "score"]
    # A claim-level detectable effect beside the single comparison's: three parts under Holm at
    # n = 3 need a larger effect than one comparison alone (2.3 sd).
    assert "3 parts" in claim["detectable"] and "one comparison alone: 2.30 sd" in claim["detectable"]


def test_samples_claim_is_contradicted_by_one_head(built: tuple[Path, dict, str]) -> None:
    claim = claims_of(built[1])[2]
    primary = next(t for t in claim["tests"] if t["primary"])
    verdicts = {p["label"]: p["verdict"] for p in primary["parts"]}
    assert verdicts == {
        "eps_simple − eps_elbo": Verdict.HOLDS,
        "x0_eps − x0_elbo": Verdict.NOT_SHOWN,
        "score_eps − score_elbo": Verdict.CONTRADICTED,
    }
    # x0's difference is −6 on every seed: no spread, so the exact sign-flip p at n = 3 (1/8).
    x0 = next(p for p in primary["parts"] if p["head"] == "x0")
    assert x0["no_spread"] and x0["permutation_p_less"] == pytest.approx(1 / 8) and x0["p_less"] < 1e-10
    assert claim["verdict"] == Verdict.CONTRADICTED
    # The same comparison on the DDIM-10 samples (every FD + 5) is its own test and agrees.
    assert claim["headline"] == (
        "contradicted: holds on eps, not shown at this n on x0, contradicted on score; "
        "the same with ddim-10 samples"
    )
    page = (built[0] / "report.md").read_text()
    assert "0.125 (exact sign-flip: the 3 differences have no spread)" in page


def test_equivalence_is_tost_and_the_identity_is_numeric(built: tuple[Path, dict, str]) -> None:
    claim = claims_of(built[1])[3]
    assert any("same objective" in fact for fact in claim["facts"])
    assert elbo_identity() < 1e-9
    tests = {(t["title"], t["metric"]): t for t in claim["tests"]}
    elbo = tests[("(c) same outcome under elbo", "nll_vlb_bpd")]
    # The heads' ELBO NLLs differ by about 0.1 per seed: a 90% interval far wider than ±0.05.
    assert elbo["margin"] == 0.05 and elbo["verdict"] == Verdict.UNDETERMINED and len(elbo["parts"]) == 3
    assert elbo["primary"] and tests[("(c) same outcome under eps", "nll_vlb_bpd")]["primary"]
    own = next(t for (title, _), t in tests.items() if title.startswith("(c) same outcome under own"))
    assert not own["primary"]
    assert (
        claim["headline"].startswith("one objective (a: ")
        and "(c: 0 of 2 weightings equivalent" in claim["headline"]
    )


def test_snr_trend_within_a_head(built: tuple[Path, dict, str]) -> None:
    """On x0: order its three weightings by low-SNR share (computed here independently), then
    Kendall's τ of FD along that order is the same every seed. On eps, two weightings: a paired
    test of (larger share) − (smaller share), the direction taken from the weights."""
    claim = claims_of(built[1])[4]
    schedule = NoiseSchedule("linear", 1000)
    alpha_bar = schedule.alphas_cumprod[1:].numpy()
    log_snr = np.log(alpha_bar / (1 - alpha_bar))
    by_hand = {Arm("x0", "eps"): np.ones(1000), Arm("x0", "own"): (1 - alpha_bar) / alpha_bar}
    for arm, weight in by_hand.items():
        share = weight[log_snr < 0].sum() / weight.sum()
        assert low_snr_share(arm, schedule, "small") == pytest.approx(share, rel=1e-9)
    shares = {a: low_snr_share(Arm.parse(a), schedule, "small") for a in ("x0_elbo", "x0_eps", "x0_simple")}
    order = sorted(shares, key=shares.__getitem__)
    assert order == ["x0_elbo", "x0_eps", "x0_simple"]
    tau = stats.kendalltau([shares[a] for a in order], [FD[a][0] for a in order]).statistic
    fd = next(t for t in claim["tests"] if t["metric"] == "fd_digits" and t["primary"])
    x0 = next(p for p in fd["parts"] if p["head"] == "x0")
    assert x0["arms"] == order and x0["mean"] == pytest.approx(tau)
    # τ is the same every seed; the exact sign-flip test's smallest p at n = 3 is 1/8, not 0.
    assert x0["permutation_p_less" if tau < 0 else "permutation_p_greater"] == pytest.approx(1 / 8)
    eps = next(p for p in fd["parts"] if p["head"] == "eps")
    assert eps["arms"] == ["eps_simple", "eps_elbo"] and eps["expect"] == "negative"
    assert shares_of(schedule, "eps_simple") > shares_of(schedule, "eps_elbo")
    nll = next(t for t in claim["tests"] if t["metric"] == "nll_vlb_bpd" and t["primary"])
    assert {p["expect"] for p in nll["parts"]} == {"positive"}
    # Holm over the six primary parts: eps's two pairs pass (p 0.0014 ≤ 0.05/6, 0.0065 ≤ 0.05/5);
    # the trends' 1/8 cannot, so the claim is not shown, and the headline says where it held.
    assert [p["verdict"] for t in (fd, nll) for p in t["parts"] if p["head"] == "eps"] == [
        Verdict.HOLDS,
        Verdict.HOLDS,
    ]
    assert claim["verdict"] == Verdict.NOT_SHOWN
    assert claim["headline"] == "not shown at this n: holds on eps, not shown at this n on x0 and score"


def shares_of(schedule: NoiseSchedule, label: str) -> float:
    return low_snr_share(Arm.parse(label), schedule, "small")


def test_verdicts_along_the_budget_make_the_headline_provisional(built: tuple[Path, dict, str]) -> None:
    out, payload, _ = built
    status = claims_of(payload)[1]["status"]
    assert status["verdicts"] == {"50": Verdict.CONTRADICTED, "100": Verdict.HOLDS} and not status["settled"]
    assert status["text"].startswith("provisional at 100 steps: the verdict was 'contradicted' at 50 steps")
    assert "moves" in status["text"] and "per doubling on val_vlb_bpd" in status["text"]
    # eps_elbo − eps_simple in val VLB: −(0.2 + 1.3) ... per seed k: Δ(50) = 0.2 + 0.05 k, Δ(100) = −GAP[k].
    (trend,) = [t for t in status["trends"] if t["comparison"] == "eps_elbo − eps_simple"]
    assert trend["deltas"]["50"] == pytest.approx(0.25) and trend["deltas"]["100"] == pytest.approx(-0.5)
    assert trend["slope_per_doubling"]["mean"] == pytest.approx(-0.75)
    assert trend["zero_crossing_steps"] is None  # Δ already has the slope's sign
    page = (out / "report.md").read_text()
    assert "provisional at 100 steps" in page and "budget_curves.png" in payload["figures"]


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


def test_markdown_tables_keep_one_row_per_line(built: tuple[Path, dict, str]) -> None:
    """A comparison cell holds two lines (mean ± sd, then Δ): in Markdown they are joined by <br>,
    so every table row stays one line with the header's number of cells."""
    page = (built[0] / "report.md").read_text()
    table = page.split("## Comparison")[1].split("\n\n")[3].splitlines()
    cells = {line.count(" | ") for line in table if line.startswith("| ")}
    assert len(cells) == 1 and "<br>Δ " in table[2] and table[2].startswith("| eps_elbo |")


def test_incomplete_runs_are_listed_not_fatal(built: tuple[Path, dict, str]) -> None:
    out, payload, _ = built
    reasons = {Path(i["directory"]).name: i["reason"] for i in payload["incomplete"]}
    assert {"s9-half", "s8-unfinished"} <= set(reasons)
    assert "not valid JSON" in reasons["s9-half"] and "no results.json" in reasons["s8-unfinished"]
    assert payload["runs"] == 24
    # An incomplete run carries its Arm (from its config, never its folder name); `?` where none is readable.
    unfinished = load_run(out.parent.parent / "trials" / "default-digits" / "x0_elbo" / "s8-unfinished")
    assert unfinished.arm == Arm("x0", "elbo") and unfinished.label == "x0_elbo"
    assert {i["arm"] for i in payload["incomplete"]} == {"x0_elbo", "eps_simple", "?"}
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
    assert "`sample_settings@ddim-10.steps`: 10" in summary
    assert "**Claim 2** — " in summary and "<strong>contradicted: holds on eps" in page


def test_smoke_group_prints_no_verdict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for arm in ARMS[:2]:
        for seed in SEEDS:
            write_run(tmp_path, arm, seed, profile="smoke")
    assert report_cli.main(["--runs", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    (group,) = [p for p in (tmp_path / "report").iterdir() if p.is_dir()]
    payload = json.loads((group / "report.json").read_text())
    assert payload["plumbing"] and payload["claims"] == []
    page = (group / "report.md").read_text()
    assert "plumbing check: no verdict" in page and "plumbing check: no verdict" in printed
    for word in (
        Verdict.HOLDS,
        Verdict.CONTRADICTED,
        Verdict.NOT_SHOWN,
        Verdict.UNDETERMINED,
        Verdict.NOT_TESTED,
        "settled",
        "provisional",
    ):
        assert word not in page and word not in printed


def test_runs_at_different_learning_rates_are_not_pooled(tmp_path: Path) -> None:
    for lr in (1e-3, 3e-3):
        write_run(tmp_path, ARMS[0], 0, lr=lr)
    runs, _ = scan(tmp_path)
    assert len({run.group for run in runs}) == 2
    same = [load_run(d) for d in sorted((tmp_path / "trials").rglob("s0-*"))]
    config = dict(same[0].config)
    assert (
        config_group({**config, "seed": 5, "objective": {"head": "x0", "weighting": "elbo"}}) == same[0].group
    )
    assert config_group({**config, "optim": {"lr": 0.1}}) != same[0].group
    # Speed settings change how fast, never what is computed: they do not split groups.
    assert config_group({**config, "speed": {"threads": 7}}) == same[0].group


def test_a_head_without_both_arms_is_named_not_counted() -> None:
    """score has no score_eps arm: claim 1 is tested on eps and x0 alone (Holm over two parts),
    holds there, and names score with the sweep that would test it."""
    labels = ("eps_simple", "eps_elbo", "x0_elbo", "x0_eps", "score_elbo", "score_simple")
    values = {
        Arm.parse(a): {
            "nll_vlb_bpd": {s: 3.0 + 0.1 * s * s if a.endswith("elbo") else 4.0 + 0.05 * s for s in SEEDS}
        }
        for a in labels
    }
    claim = claim_likelihood(values, final_metric_set(values))
    (primary,) = [t for t in claim.tests if t.primary]
    assert [p.head for p in primary.parts] == ["eps", "x0"] and claim.verdict == Verdict.HOLDS
    assert claim.headline == "holds on eps and x0; score needs `make sweep OBJ=grid`"
    assert find(values, "eps", "eps") == Arm("eps", "own") and find(values, "x0", "own") is None


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


@pytest.mark.slow
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
    assert "<strong>contradicted: holds on eps" in dom.stdout and dom.stdout.count("<img") == len(
        payload["figures"]
    )
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*flags, "--window-size=1200,1600", f"--screenshot={shot}", url], capture_output=True, timeout=120
    )
    pixels = plt.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 0.05 and (pixels.mean(axis=2) < 0.5).mean() > 0.005


def test_bad_values_are_left_out(tmp_path: Path) -> None:
    good = write_run(tmp_path, ARMS[0], 0)
    results = json.loads((good / "results.json").read_text())
    results["metrics"].update({"nll_ode_bpd": math.inf, "fd_digits": None, "nested": {"a": 1}})
    (good / "results.json").write_text(json.dumps(results))
    run = load_run(good)
    assert sorted(run.dropped) == ["fd_digits", "nested", "nll_ode_bpd"]
    assert set(run.metrics) == {"nll_vlb_bpd", "val/vlb_bpd", "fd_digits@ddim-10"}
    bad_seed = tmp_path / "x0_simple" / "s1"
    write_config(bad_seed, Arm("x0", "own"), 1)
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
            FakeRun("a", "finished", 0, "2026-01-01T00:00:00Z", 3.5),
            FakeRun("b", "finished", 0, "2026-01-02T00:00:00Z", 3.5),
            FakeRun("c", "crashed", 1, "2026-01-03T00:00:00Z", 9.0),
            FakeRun("d", "finished", None, "2026-01-03T00:00:00Z", 9.0),
            FakeRun("e", "finished", 2, "2026-01-04T00:00:00Z", 4.0),
            FakeRun("f", "finished", 2, "2026-01-05T00:00:00Z", 4.5),
        ]


def test_wandb_source_counts_a_rerun_once_and_lists_the_rest() -> None:
    """a and b are one measurement (same metrics): counted once; e and f disagree about seed 2:
    neither is counted, and both are named, rather than the newest silently winning."""
    runs, incomplete = from_wandb("team/diffbench", api=FakeApi())
    (run,) = runs
    assert (run.metrics, run.seed, run.arm) == ({"nll_vlb_bpd": 3.5}, 0, Arm("eps", "own"))
    assert run.group.startswith("default-digits-100steps-")
    reasons = {str(item.directory).rsplit("/", 1)[1]: item.reason for item in incomplete}
    assert set(reasons) == {"b", "c", "d", "e", "f"}
    assert reasons["b"] == "a copy of wandb:team/diffbench/a (identical metrics): counted once"
    assert reasons["c"] == "W&B state crashed" and reasons["d"] == "no final metrics or config"
    assert "2 runs of eps_simple seed 2 in this group disagree" in reasons["e"] == reasons["f"]
    assert torch.isfinite(torch.tensor(run.metrics["nll_vlb_bpd"]))


@pytest.mark.slow
def test_learning_rate_check_says_whether_the_ranking_changes(tmp_path: Path) -> None:
    """Two learning rates, one seed: at 1e-3 eps_elbo has the lower NLL, at 3e-3 the ranking is
    turned around by lowering eps_simple's NLL below it."""
    for lr in (1e-3, 3e-3):
        for arm in ARMS[:2]:
            directory = write_run(tmp_path, arm, 0, lr=lr)
            if lr == 3e-3 and arm == ARMS[0]:
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


def metrics_for(seed: int, shift: float = 0.0) -> dict[str, float]:
    return {"nll_vlb_bpd": 3.0 + 0.1 * seed + shift, "fd_digits": 10.0 + seed + shift}


def test_collection_lists_what_it_cannot_count(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A copy with identical metrics counts once; copies that disagree, a seed that differs
    between results.json and config.yaml and a null metric are listed and left out; runs kept
    below a folder named `checkpoints` are still found; the sweep summary reads through the same
    collection and does not crash on the null."""
    root = tmp_path / "checkpoints" / "runs"
    eps, elbo = Arm("eps", "own"), Arm("eps", "elbo")
    dirs = [
        write_fabricated(root, arm, seed, metrics_for(seed, arm == elbo))
        for arm in (eps, elbo)
        for seed in SEEDS
    ]
    copy = write_fabricated(root, eps, 0, metrics_for(0), name="copy-of-s0")
    write_fabricated(root, elbo, 1, metrics_for(1, 5.0), name="other-s1")
    swapped = write_fabricated(root, elbo, 2, metrics_for(2), name="swapped")
    results = json.loads((swapped / "results.json").read_text())
    (swapped / "results.json").write_text(json.dumps({**results, "seed": 0}))
    nulled = dirs[2]
    results = json.loads((nulled / "results.json").read_text())
    (nulled / "results.json").write_text(
        json.dumps({**results, "metrics": {**results["metrics"], "fd_digits": None}})
    )
    runs, listed = scan(root)
    reasons = {Path(str(i.directory)).name: i.reason for i in listed}
    assert "identical metrics" in reasons["copy-of-s0"]
    assert "disagree" in reasons["other-s1"] and "disagree" in reasons["s1"]
    assert "says seed 0 but config.yaml says seed 2" in reasons["swapped"]
    assert sorted((r.arm.label, r.seed) for r in runs) == [
        ("eps_elbo", 0),
        ("eps_elbo", 2),
        ("eps_simple", 0),
        ("eps_simple", 1),
        ("eps_simple", 2),
    ]
    assert [r.dropped for r in runs if r.directory == nulled] == [["fd_digits"]]
    text = summarize_trials([*dirs, copy], tmp_path / "summary")
    assert "not finite, left out: eps_simple seed 2 fd_digits" in text and "counted once" in text
    assert report_cli.main(["--runs", str(root), "--no-figures"]) == 0
    (group,) = (root / "report").iterdir()
    payload = json.loads((group / "report.json").read_text())
    listed_names = {Path(p["directory"]).name for p in payload["incomplete"]}
    assert {"copy-of-s0", "other-s1", "s1", "swapped", "s2"} <= listed_names
    assert payload["table"]["eps_elbo"]["nll_vlb_bpd"]["seeds"] == {"0": 4.0, "2": 4.2}


def test_conflicting_margins_judge_no_equivalence(tmp_path: Path) -> None:
    for arm in (Arm("eps", "elbo"), Arm("x0", "elbo")):
        for seed in SEEDS:
            margins = {"nll_vlb_bpd": 0.5 if (arm.head, seed) == ("x0", 2) else 0.05}
            write_fabricated(tmp_path, arm, seed, metrics_for(seed), margins=margins)
    assert report_cli.main(["--runs", str(tmp_path), "--no-figures"]) == 0
    (group,) = (tmp_path / "report").iterdir()
    payload = json.loads((group / "report.json").read_text())
    claim = claims_of(payload)[3]
    assert claim["verdict"] == Verdict.NOT_TESTED and claim["tests"] == []
    assert "(c) not judged: the runs declare different margins" in claim["headline"]
    assert any(
        "report.margins.nll_vlb_bpd: 0.05 in most runs, but" in p["reason"]
        and "x0_elbo s2: 0.5" in p["reason"]
        for p in payload["incomplete"]
    )


def settling_runs(root: Path, late_gap: float) -> dict:
    """eps_elbo beats eps_simple by 1 bpd (0.9, 1.0, 1.1 per seed) at the final evaluation and at
    budget 100; at budget 50 by 1 + late_gap. Every curve moves by under 5% per doubling when
    late_gap is small."""
    for arm in (Arm("eps", "own"), Arm("eps", "elbo")):
        for seed in SEEDS:
            gap = (0.9 + 0.1 * seed) if arm.weighting == "own" else 0.0
            final = {"nll_vlb_bpd": 20.0 + gap, "val_vlb_bpd": 20.0 + gap}
            rows = [
                {"step": 50, "val_vlb_bpd": 20.0 + gap + (late_gap if arm.weighting == "own" else 0.0)},
                {"step": 100, "val_vlb_bpd": 20.0 + gap},
            ]
            write_fabricated(root, arm, seed, final, rows)
    assert report_cli.main(["--runs", str(root), "--no-figures"]) == 0
    (group,) = (root / "report").iterdir()
    return claims_of(json.loads((group / "report.json").read_text()))[1]


def test_flat_agreeing_budgets_read_settled_and_a_turning_one_provisional(tmp_path: Path) -> None:
    settled = settling_runs(tmp_path / "flat", 0.2)
    assert settled["verdict"] == Verdict.HOLDS and settled["status"]["settled"]
    assert settled["status"]["text"] == (
        "settled: the same verdict at 50 and 100 steps, every arm flat (< 5% per doubling)"
    )
    # At 50 steps eps_simple is 1 bpd ahead: the verdict turned, and eps_simple moved ~10%.
    turning = settling_runs(tmp_path / "turning", -2.0)
    status = turning["status"]
    assert turning["verdict"] == Verdict.HOLDS and not status["settled"]
    assert "the verdict was 'contradicted' at 50 steps and 'holds' at 100" in status["text"]
    (trend,) = status["trends"]
    # Δ(50) = +1 (seed-mean), Δ(100) = −1: slope −2 per doubling, no crossing ahead (already negative).
    assert trend["deltas"] == {"50": pytest.approx(1.0), "100": pytest.approx(-1.0)}
    assert trend["slope_per_doubling"]["mean"] == pytest.approx(-2.0) and trend["zero_crossing_steps"] is None


def test_a_closing_gap_gives_its_zero_crossing_as_an_extrapolation(tmp_path: Path) -> None:
    """eps_simple is behind by 1 bpd at 100 steps and by 2 at 50: Δ = eps_elbo − eps_simple rises
    by 1 per doubling toward zero, which it would reach one doubling later, at 200 steps. Both
    curves are flat by the 5% rule (eps_simple moved 1/22 = 4.5%) and the verdicts agree, yet the
    headline stays provisional: the difference is heading for the other sign."""
    claim = settling_runs(tmp_path, 1.0)
    (trend,) = claim["status"]["trends"]
    assert trend["slope_per_doubling"]["mean"] == pytest.approx(1.0)
    assert trend["zero_crossing_steps"] == pytest.approx(200.0)
    assert (
        claim["status"]["verdicts"] == {"50": Verdict.HOLDS, "100": Verdict.HOLDS}
        and not claim["status"]["settled"]
    )
    assert claim["status"]["text"] == (
        "provisional at 100 steps: eps_elbo − eps_simple on val_vlb_bpd would reach zero by about 200 steps "
        "at its slope per doubling"
    )


@pytest.mark.parametrize(("version", "phrase"), [("2", "'2'"), (None, "None"), (99, "99"), (True, "True")])
def test_an_unknown_schema_version_is_listed_with_its_reason(
    tmp_path: Path, version: object, phrase: str
) -> None:
    """A results.json that is not a known schema version is unreadable, said so, and never raised
    on; a budget row without a usable step is passed over; neither stops the report or the summary."""
    good = write_fabricated(tmp_path, Arm("eps", "own"), 0, metrics_for(0))
    odd = write_fabricated(
        tmp_path, Arm("eps", "elbo"), 0, metrics_for(0), [{"step": None, "val_vlb_bpd": 3.0}]
    )
    results = json.loads((odd / "results.json").read_text())
    (odd / "results.json").write_text(json.dumps({**results, "schema_version": version}))
    runs, listed = scan(tmp_path)
    assert [r.directory for r in runs] == [good]
    (problem,) = listed
    assert f"schema_version {phrase} is not one this diffbench reads" in problem.reason
    assert "newer version" in problem.reason
    assert report_cli.main(["--runs", str(tmp_path), "--no-figures"]) == 0
    summarize_trials([good, odd], tmp_path / "summary")
    table = json.loads((tmp_path / "summary.json").read_text())["table"]
    assert list(table) == ["eps_simple"]
    results["budgets"] = [{"step": None, "val_vlb_bpd": 3.0}, {"step": 100, "val_vlb_bpd": 2.0}]
    (odd / "results.json").write_text(json.dumps(results))
    (run,) = [r for r in scan(tmp_path)[0] if r.directory == odd]
    assert [row["step"] for row in run.budgets] == [100]
