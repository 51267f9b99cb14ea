"""Every preset trains; the CLI leaves a complete run directory; bad input fails cleanly."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from conftest import TINY, spec_of
from diffbench.config import available
from diffbench.core.diffusion import q_sample
from diffbench.core.likelihood import nats_to_bpd, prior_kl, vlb_term
from diffbench.sampling.nll import one_term_vlb_bpd
from diffbench.spec import RunSpec
from diffbench.train import module as module_code
from diffbench.train.build import build_datamodule, build_module
from diffbench.train.module import DiffusionModule

EXPERIMENTS = available("experiment")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_preset_runs_one_training_step(name: str) -> None:
    cfg = spec_of([f"experiment={name}", *TINY])
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.num_levels)
    optimizer = module.configure_optimizers()["optimizer"]
    batch = next(iter(datamodule.train_dataloader()))
    before = [p.detach().clone() for p in module.net.parameters()]
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.net.parameters()))
    x = batch[0][:3]
    t = torch.tensor([1, 10, 20])
    eps, x0, score = module.denoiser(x, t), module.denoiser.x0(x, t), module.denoiser.score(x, t)
    alpha_bar = module.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(
        x0.double(), (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt(), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(score.double(), -eps / (1 - alpha_bar).sqrt(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["eps_elbo", "x0_simple"])
def test_validation_vlb_is_unbiased_for_the_whole_bound(name: str) -> None:
    """Σ_t p(t)·[L_T + L_{t−1}/p(t) + L_0] over t = 2..T with the noise fixed is exactly the bound
    L_T + L_0 + Σ_{t≥2} L_{t−1}, each term computed here directly from `vlb_term`."""
    cfg = spec_of([f"experiment={name}", *TINY])
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.num_levels).eval()
    x0 = datamodule.split("val")[:3]
    generator = torch.Generator().manual_seed(0)
    schedule, T = module.schedule, module.num_timesteps
    probs = torch.rand(T - 1, generator=generator, dtype=torch.float64) + 0.1
    probs /= probs.sum()
    # vlb_bpd draws one noise tensor per evaluated t, in order: first the decoder's, then t's.
    noise = torch.Generator().manual_seed(7)
    eps_decoder, eps = (torch.randn(x0.shape, generator=noise, dtype=torch.float64) for _ in range(2))

    def term(step: int, noise: torch.Tensor) -> torch.Tensor:
        t = torch.full((len(x0),), step)
        xt = q_sample(x0.double(), noise.double(), schedule.at(schedule.alphas_cumprod, t, x0.ndim)).float()
        return vlb_term(schedule, x0, xt, t, module.denoiser(xt, t), datamodule.num_levels, "small")

    with torch.no_grad():
        expectation = sum(
            probs[t - 2]
            * one_term_vlb_bpd(
                module.denoiser,
                schedule,
                x0,
                datamodule.num_levels,
                torch.Generator().manual_seed(7),
                torch.full((3,), t),
                probs[t - 2].expand(3),
            )
            for t in range(2, T + 1)
        )
        nats = prior_kl(schedule, x0) + term(1, eps_decoder) + sum(term(t, eps) for t in range(2, T + 1))
    torch.testing.assert_close(expectation, nats_to_bpd(nats, x0[0].numel()), rtol=1e-6, atol=1e-8)


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "diffbench.run", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_end_to_end_from_another_directory(tmp_path: Path) -> None:
    proc = run_cli(["experiment=eps_elbo", *TINY, "run.root=out", "eval.budget_base=1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "out" / "eps_elbo").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 2
    assert results["head"] == "eps" and results["weighting"] == "elbo" and results["arm"] == "eps_elbo"
    assert results["schema_version"] == 2
    assert [row["step"] for row in results["budgets"]] == [1, 2]
    assert {"val_vlb_bpd", "val_eps_mse", "fd_digits", "kid_digits"} <= set(results["budgets"][0])
    assert len((run_dir / "budgets.csv").read_text().splitlines()) == 3
    assert {"val/loss", "val/eps_mse", "val/vlb_bpd"} <= set(results["metrics"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "samples.png").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/grad_norm", "train/clipped", "val/vlb_bpd", "step"} <= set(header)
    optimisation = results["optimisation"]
    assert optimisation["gradient_clip_val"] is None and optimisation["clipped_fraction"] == 0.0
    assert optimisation["steps_measured"] == 2
    assert 0 < optimisation["grad_norm_median"] <= optimisation["grad_norm_max"] < math.inf
    noise = results["evaluation"]["sample_settings"]["evaluation_noise"]
    assert (
        noise["half_size"] == 4
        and len(noise["fd_digits"]) == 2
        and noise["fd_digits"][0] != noise["fd_digits"][1]
    )
    baselines = results["evaluation"]["baselines"]
    assert 0 < baselines["histogram_nll_bpd"] < math.log2(17)
    assert 0 <= baselines["fd_digits_real_vs_real"] < math.inf
    assert baselines["real_split"] == "train (8 images)"
    assert not {"histogram_nll_bpd", "fd_digits_real_vs_real"} & set(results["metrics"])
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (table,) = (offline / "files" / "media" / "table" / "curves").glob("vlb_terms_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == ["t", "term_bpd"] and len(logged["data"]) == 6  # decoder + 5 strata
    assert "results in" in proc.stdout


@pytest.mark.slow
def test_cli_unknown_experiment_lists_choices_without_traceback(tmp_path: Path) -> None:
    proc = run_cli(["experiment=eps_simpel"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert all(name in proc.stderr for name in EXPERIMENTS)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("arg", "message"), [("trainer.max_stepz=3", "Did you mean"), ("seed=abc", "wrong type")]
)
@pytest.mark.slow
def test_cli_bad_override_is_explained(tmp_path: Path, arg: str, message: str) -> None:
    proc = run_cli(["experiment=eps_simple", arg], cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_compiled_module_keeps_clean_checkpoint_keys() -> None:
    cfg = spec_of(["experiment=eps_simple", *TINY, "speed.compile=true"])
    module = build_module(cfg, 17)
    keys = list(module.state_dict())
    assert keys and not any("_orig_mod" in key for key in keys)
    plain = build_module(spec_of(["experiment=eps_simple", *TINY]), 17)
    assert keys == list(plain.state_dict())


def test_resume_keeps_only_metrics_rows_before_the_checkpoint(tmp_path: Path) -> None:
    """A crash between a checkpoint's CSV flush and its file leaves rows past the checkpoint
    that is resumed from; they are dropped so that no step appears twice."""
    from lightning.pytorch.loggers import CSVLogger

    from diffbench.train.callbacks import keep_previous_metrics

    rows = ["step,train/loss,val/loss", *(f"{s},{s / 10},," for s in range(10)), "9,,0.5"]
    (tmp_path / "metrics.csv").write_text("\n".join(rows) + "\n")
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="")
    keep_previous_metrics(logger, tmp_path / "metrics.csv", resume_step=5)
    logger.log_metrics({"train/loss": 0.55}, step=5)
    logger.save()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == ["step", "train/loss", "val/loss"]
    assert [int(line.split(",")[0]) for line in lines[1:]] == [0, 1, 2, 3, 4, 5]


def test_logged_grad_norm_is_the_total_norm_clip_grad_norm_returns() -> None:
    """One step by hand: the hook's norm is clip_grad_norm_'s total norm on the same gradients,
    and measuring it leaves the gradients untouched."""
    cfg = spec_of(["experiment=eps_elbo", *TINY, "trainer.gradient_clip_val=1.0"])
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.num_levels)
    optimizer = module.configure_optimizers()["optimizer"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: nothing to log to
        module.training_step(next(iter(datamodule.train_dataloader())), 0).backward()
        grads = [p.grad.clone() for p in module.net.parameters()]
        module.on_before_optimizer_step(optimizer)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, module.net.parameters()))
    total = torch.nn.utils.clip_grad_norm_(module.net.parameters(), 1.0)
    record = module.optimisation_record()
    assert record["steps_measured"] == 1 and record["grad_norm_max"] == float(total)
    assert record["clipped_fraction"] == float(total > 1.0) and record["gradient_clip_val"] == 1.0


class NormBeforeClipping(Callback):
    """clip_grad_norm_'s total norm per step, taken in the callback hook, which Lightning runs
    before the module's hook and before it clips (an infinite threshold scales by exactly 1)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, module: L.LightningModule, optimizer: Any) -> None:
        self.norms.append(float(torch.nn.utils.clip_grad_norm_(module.net.parameters(), math.inf)))


def fit(
    module: DiffusionModule, cfg: RunSpec, steps: int, log_dir: Path, ckpt_path: Path | None = None
) -> list[dict]:
    """`steps` training steps in a bare Trainer with the config's clipping; metrics.csv's rows."""
    datamodule = build_datamodule(cfg)
    reference = NormBeforeClipping()
    trainer = L.Trainer(
        max_steps=steps,
        gradient_clip_val=cfg.optim.gradient_clip_val,
        logger=CSVLogger(save_dir=str(log_dir), name="", version=""),
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[reference],
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    trainer.save_checkpoint(log_dir / "last.ckpt")
    assert module.grad_norms[-len(reference.norms) :] == reference.norms
    with (log_dir / "metrics.csv").open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("train/grad_norm")]


@pytest.mark.parametrize(("clip", "clipped"), [(None, 0.0), (1e-6, 1.0)])
def test_every_step_logs_its_grad_norm_before_clipping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clip: float | None, clipped: float
) -> None:
    """Off: nothing is clipped. A tiny threshold: every step is, and the norm logged is still the
    one before clipping (equal to the callback's, which runs first). Norms reach the host both in
    bulk during training (every 2 steps here) and when the record is read."""
    monkeypatch.setattr(module_code, "PENDING_STEPS", 2)
    override = "null" if clip is None else str(clip)
    cfg = spec_of(["experiment=eps_elbo", *TINY, f"trainer.gradient_clip_val={override}"])
    module = build_module(cfg, build_datamodule(cfg).num_levels)
    rows = fit(module, cfg, 3, tmp_path)
    assert [int(row["step"]) for row in rows] == [0, 1, 2]
    assert [float(row["train/clipped"]) for row in rows] == [clipped] * 3
    logged = [float(row["train/grad_norm"]) for row in rows]
    assert logged == pytest.approx(module.grad_norms, rel=1e-6) and min(logged) > 1e-3
    record = module.optimisation_record()
    assert record["clipped_fraction"] == clipped and record["steps_measured"] == 3
    assert record["gradient_clip_val"] == clip and record["grad_norm_max"] == max(module.grad_norms)
    assert record["grad_norm_median"] == sorted(module.grad_norms)[1]


def test_optimisation_record_survives_resume(tmp_path: Path) -> None:
    """Steps measured before a checkpoint come back with it, so the record covers the whole run."""
    cfg = spec_of(["experiment=eps_elbo", *TINY, "trainer.gradient_clip_val=1e-6"])
    levels = build_datamodule(cfg).num_levels
    first = build_module(cfg, levels)
    fit(first, cfg, 2, tmp_path / "first")
    resumed = build_module(cfg, levels)
    fit(resumed, cfg, 4, tmp_path / "resumed", ckpt_path=tmp_path / "first" / "last.ckpt")
    assert resumed.grad_norms[:2] == first.grad_norms and len(resumed.grad_norms) == 4
    assert resumed.optimisation_record()["clipped_fraction"] == 1.0
    assert resumed.clipped_steps == 4


def test_fused_and_foreach_adamw_agree_to_float_tolerance() -> None:
    """speed.fused_adamw changes how fast, not what: five identical steps end at the same weights."""
    cfg = spec_of(["experiment=eps_simple", *TINY])
    modules = []
    for fused in (True, False):
        torch.manual_seed(0)
        module = build_module(cfg, 17)
        module.hparams.fused = fused
        modules.append(module)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.randint(1, 20, (8,), generator=torch.Generator().manual_seed(2))
    start = [p.detach().clone() for p in modules[0].net.parameters()]
    for module in modules:
        optimizer = module.configure_optimizers()["optimizer"]
        assert optimizer.defaults.get("fused") is (True if module.hparams.fused else None)
        for _ in range(5):
            optimizer.zero_grad()
            (module.net(x, t) - x).pow(2).mean().backward()  # the output layer starts at zero
            optimizer.step()
    fused, foreach = (list(m.net.parameters()) for m in modules)
    for a, b in zip(fused, foreach, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, s) for a, s in zip(fused, start)), "the steps moved the weights"


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_reads_no_global_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dropout: float
) -> None:
    """Every step's t, ε and dropout come from the run's own streams: reseeding and drawing from
    torch's global generator before every step leaves the trained weights bit for bit the same."""
    from diffbench.pipeline import train

    overrides = [*TINY, "trainer.max_steps=4", "eval.enabled=false", f"model.dropout={dropout}"]
    train(spec_of(["head=eps", "weighting=elbo_is", *overrides, f"run.dir={tmp_path / 'calm'}"]))
    original = DiffusionModule.training_step

    def disturbed(self: DiffusionModule, batch: Any, batch_idx: int) -> Any:
        torch.manual_seed(1234 + self.global_step)
        torch.rand(1000)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", disturbed)
    train(spec_of(["head=eps", "weighting=elbo_is", *overrides, f"run.dir={tmp_path / 'disturbed'}"]))
    calm, shaken = (
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for name in ("calm", "disturbed")
    )
    assert calm.keys() == shaken.keys() and all(torch.equal(calm[k], shaken[k]) for k in calm)
    assert not all(
        torch.equal(calm[k], v)
        for k, v in build_module(spec_of(["head=eps", "weighting=elbo_is", *overrides]), 17)
        .state_dict()
        .items()
    ), "the weights trained"
