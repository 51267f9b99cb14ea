"""The report at its edges: a head added as docs/extending.md describes, a settled run whose
difference is large and stable (a slope per doubling near zero, where an extrapolated zero
crossing would overflow), and a group whose report fails beside groups whose reports do not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torch import Tensor

from diffbench.analysis import settled
from diffbench.analysis.claims import elbo_identity
from diffbench.analysis.inference import compare
from diffbench.analysis.verdicts import Standing, Verdict
from diffbench.cli import report as report_cli
from diffbench.core.arms import Arm
from diffbench.core.heads import HEADS, Head
from fabricate import write_run

SEEDS = (0, 1, 2)


class FlowHead(Head):
    """The example head of docs/extending.md, with only its three documented methods."""

    name = "flow"
    description = "u = ε − x0, the direction from the data to the noise"

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        return eps - x0

    def to_eps(self, output: Tensor, xt: Tensor, alpha_bar: Tensor) -> Tensor:
        a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return (xt + a * output) / (a + b)

    def eps_factor(self, alpha_bar: Tensor) -> Tensor:
        a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return (a / (a + b)) ** 2


def report_of(root: Path, capsys: pytest.CaptureFixture) -> tuple[dict[str, dict], str, str]:
    """Every group's report.json after the report command, and what it printed."""
    code = report_cli.main(["--runs", str(root), "--no-figures"])
    out, err = capsys.readouterr()
    assert code == 0, err
    groups = {
        p.name: json.loads((p / "report.json").read_text()) for p in (root / "report").iterdir() if p.is_dir()
    }
    return groups, out, err


def claims_of(payload: dict) -> dict[int, dict]:
    return {c["number"]: c for c in payload["claims"]}


def test_a_fifth_head_registered_as_documented_gets_claim_three(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """With FlowHead in HEADS the identity is read from its own to_eps, and the report's claim 3
    states it for five heads and compares flow_elbo with eps_elbo under the ELBO."""
    monkeypatch.setitem(HEADS, "flow", FlowHead())
    assert elbo_identity() < 1e-9
    for arm in (Arm("eps", "elbo"), Arm("flow", "elbo")):
        for seed in SEEDS:
            nll = 3.0 + 0.01 * seed + (0.002 + 0.001 * seed if arm.head == "flow" else 0.0)
            write_run(tmp_path, arm, seed, {"nll_vlb_bpd": nll})
    groups, out, _ = report_of(tmp_path, capsys)
    (payload,) = groups.values()
    claim = claims_of(payload)[3]
    (fact,) = [f for f in claim["facts"] if f.startswith("(a) same objective")]
    assert "the 5 heads' ELBO losses" in fact
    assert float(fact.split("differ by at most ")[1].split(" ")[0]) < 1e-9
    (test,) = [t for t in claim["tests"] if t["title"] == "(c) same outcome under elbo"]
    assert [p["head"] for p in test["parts"]] == ["eps/flow"]
    assert test["verdict"] == Verdict.EQUIVALENT and "equivalent training outcomes" in claim["headline"]
    assert "claim 3: one objective" in out


def stable_runs(root: Path, lr: float, gap: float, step: float) -> None:
    """eps_elbo below eps_simple by `gap` bpd (0.9, 1.0, 1.1 × gap per seed) at budgets 1000 and
    2000 and at the final evaluation, the gap closing by `step` (per seed, with a little spread)
    per doubling: what a long, converged run looks like when `step` is tiny beside `gap`."""
    for arm in (Arm("eps", "own"), Arm("eps", "elbo")):
        for seed in SEEDS:
            behind = gap * (0.9 + 0.1 * seed) if arm.weighting == "own" else 0.0
            closing = step * (1 + 0.1 * seed) if arm.weighting == "own" else 0.0
            final = 20.0 + behind
            rows = [
                {"step": 1000, "val_vlb_bpd": final + closing},
                {"step": 2000, "val_vlb_bpd": final},
            ]
            write_run(
                root, arm, seed, {"nll_vlb_bpd": final, "val_vlb_bpd": final}, rows, f"s{seed}-{lr:g}", lr=lr
            )


def test_a_large_stable_difference_with_a_near_zero_slope_is_reported_beside_another_group(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """At lr 1e-3 the gap of 1 bpd closes by about 1e-4 per doubling: its zero crossing, some 10⁴
    doublings away, was computed as 2000 · 2^10000 and stopped the whole command with
    OverflowError. Now it is "no crossing within 8 doublings" and the headline is settled; the
    group at lr 3e-3, whose gap closes by about 1 bpd per doubling, is reported beside it with its
    crossing under 4000 steps."""
    stable_runs(tmp_path, 1e-3, 1.0, 1e-4)
    stable_runs(tmp_path, 3e-3, 1.0, 1.0)
    groups, out, err = report_of(tmp_path, capsys)
    assert len(groups) == 2 and "Traceback" not in err and "unreadable" not in err
    pages = {g: (tmp_path / "report" / g / "report.md").read_text() for g in groups}
    (stable,) = [g for g, page in pages.items() if "`optim.lr`: 0.001" in page]
    (closing,) = [g for g in groups if g != stable]
    claim = claims_of(groups[stable])[1]
    (trend,) = claim["status"]["trends"]
    assert trend["slope_per_doubling"]["mean"] == pytest.approx(1.1e-4)
    assert trend["zero_crossing_steps"] is None and trend["zero_crossing_doublings"] > 8
    assert trend["zero_crossing"] == "no crossing within 8 doublings"
    assert claim["verdict"] == Verdict.HOLDS and claim["status"]["settled"] and claim["settled"]
    assert "no crossing within 8 doublings" in pages[stable]
    near = claims_of(groups[closing])[1]
    (trend,) = near["status"]["trends"]
    # Δ(2000) = −1, slope +1.1 per doubling (1, 1.1, 1.2 over the seeds): zero after 1/1.1 doublings.
    assert trend["zero_crossing_steps"] == pytest.approx(2000 * 2 ** (1 / 1.1))
    assert not near["status"]["settled"] and "would reach zero by about" in near["status"]["text"]
    assert f"[report] {stable}: " in out and f"[report] {closing}: " in out
    assert f"claim 1: holds on eps [{Standing.SETTLED}]" in out
    assert f"claim 1: holds on eps [{Standing.PROVISIONAL}]" in out


def test_a_crossing_too_far_to_name_is_never_a_power_of_two() -> None:
    """A slope that is zero to rounding gives infinitely many doublings: no number, no overflow."""
    slope = compare("slope", "val_vlb_bpd", {0: 1e-300, 1: 2e-300}, {0: 0.0, 1: 0.0})
    for doublings in (math.inf, 1e6, settled.FAR_DOUBLINGS + 0.5):
        trend = settled.DeltaTrend("a − b", "val_vlb_bpd", {1000: -1.0, 2000: -1.0}, slope, doublings)
        assert trend.far and trend.crossing is None
        assert trend.crossing_text() == f"no crossing within {settled.FAR_DOUBLINGS} doublings"
    near = settled.DeltaTrend("a − b", "val_vlb_bpd", {1000: -2.0, 2000: -1.0}, slope, 1.0)
    assert near.crossing == 4000.0 and near.crossing_text() == "≈ 4,000 steps (extrapolation)"


def test_one_group_that_fails_leaves_the_others_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A report that raises is named with its reason in one line; the other group's report is
    written and the command ends with exit code 1 rather than a traceback."""
    stable_runs(tmp_path, 1e-3, 1.0, 1e-4)
    stable_runs(tmp_path, 3e-3, 1.0, 1.0)
    original = report_cli.build_report
    failing: list[str] = []

    def fail_first(group: str, *args: object) -> object:
        if not failing:
            failing.append(group)
            raise ValueError("a reason")
        return original(group, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(report_cli, "build_report", fail_first)
    assert report_cli.main(["--runs", str(tmp_path), "--no-figures"]) == 1
    out, err = capsys.readouterr()
    (group,) = failing
    assert f"[report] {group}: unreadable, no report written (ValueError: a reason)" in err
    assert f"not written: {group}" in err and "Traceback" not in err
    written = [p.name for p in (tmp_path / "report").iterdir() if (p / "report.json").is_file()]
    assert len(written) == 1 and written[0] != group and f"[report] {written[0]}: " in out
