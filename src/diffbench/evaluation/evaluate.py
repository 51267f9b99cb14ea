"""Evaluation that makes the arms comparable: NLL as the discrete VLB and through the
probability-flow ODE, sample-quality metrics, x̂0 trajectories, and on `gmm` the ground truth.

`python -m diffbench.evaluate run_dir=… [sampler=ddim steps=100 …]` evaluates a finished run
again; `diffbench.run` calls `evaluate` after training. Every metric is recorded with the
settings (sampler, steps, sample count, timesteps) that produced it."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch import Tensor

from diffbench.core.diffusion import VarianceType, q_sample
from diffbench.core.heads import Denoiser
from diffbench.data.base import ArrayDataModule
from diffbench.evaluation import groundtruth
from diffbench.evaluation.baselines import evaluate_baselines
from diffbench.evaluation.distributed import gather_rows, generator_for, world
from diffbench.evaluation.fidelity import sample_quality
from diffbench.evaluation.plots import plot_curve, save_grid
from diffbench.rundir import (
    AT,
    EPS_MSE_BY_T,
    EPS_STAR_DISTANCE,
    VLB_TERMS,
    X0_TRAJECTORY,
    RunDir,
    metric_at,
    sample_grid,
    sampler_tag,
)
from diffbench.sampling import nll, samplers

EXTRACTOR_FIELDS = {"classifier_test_accuracy"}
"""Numbers about the feature extractor, recorded with the settings rather than as metrics."""


@dataclass
class Evaluation:
    """What an evaluation measured (`metrics`, finite floats) and how (`settings`, per metric
    family: sampler, steps, sample count, timesteps, wall time), kept apart from the start."""

    metrics: dict[str, float] = field(default_factory=dict)
    settings: dict[str, dict] = field(default_factory=dict)

    def add(self, metrics: dict[str, float], settings: dict[str, dict] | None = None) -> None:
        self.metrics.update({k: float(v) for k, v in metrics.items()})
        self.settings.update(settings or {})


def evaluate_vlb(
    denoiser: Denoiser,
    x0: Tensor,
    cfg: DictConfig,
    num_levels: int | None,
    variance: VarianceType,
    seed: int,
    out: RunDir,
) -> Evaluation:
    """nll_vlb_bpd over the evaluation images: all T terms, or a stratified estimate."""
    rank, size = world()
    generator = generator_for(seed, 1, denoiser.device)
    num_timesteps = denoiser.schedule.num_timesteps
    timesteps = weights = None
    shard = x0[rank::size].to(denoiser.device)
    if cfg.vlb_timesteps:
        timesteps = nll.stratified_timesteps(num_timesteps, cfg.vlb_timesteps, generator, batch=len(shard))
        weights = nll.stratified_weights(num_timesteps, cfg.vlb_timesteps)
    start = time.perf_counter()
    result = nll.vlb_bpd(
        denoiser,
        denoiser.schedule,
        shard,
        num_levels,
        generator,
        variance=variance,
        timesteps=timesteps,
        batch_timesteps=cfg.vlb_batch_timesteps,
        progress=rank == 0,
        weights=weights,
    )
    totals = gather_rows(result.total_bpd.cpu(), len(x0))
    terms = gather_rows(result.terms_bpd.cpu(), len(x0)).mean(0)
    mean, stderr = nll.mean_and_stderr(totals)
    steps = result.timesteps.cpu().double()
    if steps.ndim == 2:
        steps = gather_rows(steps, len(x0)).mean(0)
    if rank == 0:
        out.write_curve(VLB_TERMS, steps.tolist(), terms.tolist())
        plot_curve(steps, terms, out / VLB_TERMS.png, VLB_TERMS, logy=True)
    settings = {
        "timesteps": "all"
        if timesteps is None
        else f"stratified-{cfg.vlb_timesteps}, drawn per image, plus the decoder term (t = 1)",
        "variance": variance,
        "num_images": len(x0),
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    return Evaluation({"nll_vlb_bpd": mean, "nll_vlb_bpd_stderr": stderr}, {"nll_vlb_settings": settings})


def evaluate_eps_profile(denoiser: Denoiser, x0: Tensor, cfg: DictConfig, seed: int, out: RunDir) -> None:
    """Mean ‖ε − ε̂‖²/D at `profile_timesteps` log-spaced t: the measured counterpart of each
    arm's implied ε-space weight (rank zero, first 256 images)."""
    device, schedule = denoiser.device, denoiser.schedule
    x0 = x0[:256].to(device)
    T = schedule.num_timesteps
    steps = torch.unique(
        torch.logspace(0, torch.log10(torch.tensor(float(T))), cfg.profile_timesteps).round().long()
    )
    generator = generator_for(seed, 6, device)
    errors = []
    with torch.no_grad():
        for step in steps.tolist():
            t = torch.full((len(x0),), step, device=device, dtype=torch.long)
            eps = torch.randn(x0.shape, generator=generator, device=device)
            alpha_bar = schedule.at(schedule.alphas_cumprod, t, x0.ndim)
            xt = q_sample(x0.double(), eps.double(), alpha_bar).float()
            errors.append(float((denoiser(xt, t) - eps).pow(2).mean()))
    out.write_curve(EPS_MSE_BY_T, steps.tolist(), errors)


def evaluate_ode(
    denoiser: Denoiser, x0: Tensor, cfg: DictConfig, num_levels: int | None, seed: int
) -> Evaluation:
    """nll_ode_bpd on the first `ode_images` evaluation images."""
    rank, size = world()
    x0 = x0[: cfg.ode_images]
    start = time.perf_counter()
    result = nll.ode_nll_bpd(
        denoiser,
        denoiser.schedule,
        x0[rank::size].to(denoiser.device),
        num_levels,
        generator_for(seed, 2, denoiser.device),
        rtol=cfg.ode_rtol,
        atol=cfg.ode_atol,
        progress=rank == 0,
    )
    mean, stderr = nll.mean_and_stderr(gather_rows(result.bpd.cpu(), len(x0)))
    settings = {
        "rtol": cfg.ode_rtol,
        "atol": cfg.ode_atol,
        "num_images": len(x0),
        "nfe": result.nfe,
        "dequantization": "uniform" if num_levels else "none (continuous data)",
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    return Evaluation({"nll_ode_bpd": mean, "nll_ode_bpd_stderr": stderr}, {"nll_ode_settings": settings})


def sampler_settings(sampler: str, steps: int, ev: DictConfig, ancestral_variance: VarianceType) -> dict:
    """Keyword settings of one sampler at `steps`, as recorded beside its metrics."""
    if sampler == "ancestral":
        return {"steps": steps or None, "variance": ancestral_variance}
    if sampler == "ddim":
        return {"steps": steps, "eta": ev.ddim_eta}
    if sampler == "sde":
        return {"steps": steps}
    return {"method": ev.ode_method, "steps": steps, "rtol": ev.ode_rtol, "atol": ev.ode_atol}


def parse_sampler(spec: str) -> tuple[str, int]:
    """`ddim-10` → ("ddim", 10); a bare name (`ancestral`) means every step of the schedule (0)."""
    name, _, steps = str(spec).partition("-")
    return name, int(steps) if steps else 0


def draw(
    denoiser: Denoiser, ev: DictConfig, sampler: str, settings: dict, shape: tuple[int, ...], seed: int
) -> tuple[Tensor, int]:
    """`num_samples` samples split across ranks (rank r draws r, r + W, …), each rank with its
    own generator; gathered so every sample exists exactly once. Every sampler starts from the same
    seeded stream, so two samplers of one run begin at the same noise."""
    rank, size = world()
    count = len(range(rank, ev.num_samples, size))
    generator = generator_for(seed, 3, denoiser.device)
    pieces, nfe = [], 0
    for start in range(0, count, ev.sample_batch_size):
        n = min(ev.sample_batch_size, count - start)
        result = samplers.sample(
            sampler,
            denoiser,
            denoiser.schedule,
            (n, *shape),
            generator,
            **settings,
            progress=rank == 0,
        )
        pieces.append(result.samples.cpu())
        nfe += result.nfe
    local = torch.cat(pieces) if pieces else torch.empty((0, *shape))
    return gather_rows(local, ev.num_samples), nfe


def sample_scorer(datamodule: ArrayDataModule, ev: DictConfig, data_name: str) -> Callable[[Tensor], dict]:
    """The sample metrics of a set of samples against the evaluation's real reference images."""
    return functools.partial(
        sample_quality,
        reference=datamodule.split(ev.reference_split),
        dataset=data_name,
        num_levels=datamodule.num_levels,
        inception_weights=ev.inception_weights,
        data_root=getattr(datamodule, "root", "data"),
    )


def metrics_of(quality: dict) -> dict[str, float]:
    return {k: v for k, v in quality.items() if isinstance(v, float) and k not in EXTRACTOR_FIELDS}


def evaluate_samples(
    denoiser: Denoiser,
    datamodule: ArrayDataModule,
    ev: DictConfig,
    ancestral_variance: VarianceType,
    seed: int,
    out: RunDir,
    data_name: str,
) -> tuple[Evaluation, Tensor]:
    """The sample metrics with the configured sampler (and its split-half evaluation noise), and
    again with each of `eval.also_samplers` under `<metric>@<sampler>-<steps>`, so a verdict on
    samples can be read along the number of network evaluations."""
    start = time.perf_counter()
    settings = sampler_settings(ev.sampler, ev.sampler_steps, ev, ancestral_variance)
    samples, nfe = draw(denoiser, ev, ev.sampler, settings, datamodule.image_shape, seed)
    seconds = time.perf_counter() - start
    record = {
        "sampler": ev.sampler,
        **settings,
        "num_samples": len(samples),
        "nfe_per_batch": nfe,
        "wall_time_s": round(seconds, 2),
    }
    variants = []
    for name, steps in map(parse_sampler, ev.get("also_samplers") or []):
        variant_settings = sampler_settings(name, steps, ev, ancestral_variance)
        drawn, variant_nfe = draw(denoiser, ev, name, variant_settings, datamodule.image_shape, seed)
        variant_record = {"sampler": name, **variant_settings, "nfe_per_batch": variant_nfe}
        variants.append((sampler_tag(name, steps), variant_record, drawn))
    if world()[0] != 0:
        return Evaluation(), samples
    save_grid(samples[:64], out / sample_grid(ev.sampler), nrow=8)
    score = sample_scorer(datamodule, ev, data_name)
    quality = score(samples)
    metrics = metrics_of(quality)
    record.update({k: v for k, v in quality.items() if k not in metrics})
    record["reference"] = f"{ev.reference_split} split ({len(datamodule.split(ev.reference_split))} images)"
    record["evaluation_noise"] = split_half_scores(samples, score)
    result = Evaluation(metrics, {"sample_settings": record})
    for tag, variant_record, drawn in variants:
        result.add(
            {metric_at(k, tag): v for k, v in metrics_of(score(drawn)).items()},
            {f"sample_settings{AT}{tag}": variant_record},
        )
    return result, samples


def split_half_scores(samples: Tensor, score: Callable[[Tensor], dict]) -> dict[str, object]:
    """The same model scored on two independent halves of its samples (even and odd draws): how
    much a sample metric moves with the samples alone, to set beside the seed-to-seed spread.
    A half scores a little worse than the whole (FD is biased upward at small n)."""
    if len(samples) < 8:
        return {}
    halves = [metrics_of(score(samples[start::2])) for start in (0, 1)]
    return {"half_size": len(samples) // 2, **{name: [half[name] for half in halves] for name in halves[0]}}


def evaluate_trajectory(
    denoiser: Denoiser,
    cfg: DictConfig,
    variance: VarianceType,
    shape: tuple[int, ...],
    seed: int,
    out: RunDir,
) -> None:
    """Rows: images; columns: the model's x̂0 from t = T (left) to t = 1 (right)."""
    trajectory = samplers.x0_trajectory(
        denoiser,
        denoiser.schedule,
        (cfg.trajectory_images, *shape),
        generator_for(seed, 4, denoiser.device),
        num_snapshots=10,
        variance=variance,
        steps=cfg.trajectory_steps or None,
    )
    grid = trajectory.x0_hats.transpose(0, 1).reshape(-1, *shape)
    save_grid(grid, out / X0_TRAJECTORY, nrow=trajectory.x0_hats.shape[0])


def evaluate_groundtruth(
    denoiser: Denoiser,
    datamodule: ArrayDataModule,
    x0: Tensor,
    samples: Tensor,
    cfg: DictConfig,
    seed: int,
    out: RunDir,
) -> Evaluation:
    """gmm only: exact NLL, the distance of the implied ε̂ to the optimal ε* at log-SNR-spaced t
    (plain and ELBO-weighted), and how likely the samples are under the true density."""
    mixture = datamodule.mixture
    device = denoiser.device
    profile = groundtruth.eps_star_summary(
        denoiser,
        mixture,
        denoiser.schedule,
        x0.to(device),
        generator_for(seed, 5, device),
        cfg.diffusion.variance,
        count=cfg.eval.gmm_timesteps,
    )
    out.write_curve(EPS_STAR_DISTANCE, profile.timesteps.tolist(), profile.distance.tolist())
    plot_curve(profile.timesteps, profile.distance, out / EPS_STAR_DISTANCE.png, EPS_STAR_DISTANCE, logy=True)
    exact = groundtruth.exact_nll_bpd(mixture, x0)
    mean, stderr = nll.mean_and_stderr(exact)
    return Evaluation(
        {
            "nll_exact_bpd": mean,
            "nll_exact_bpd_stderr": stderr,
            **profile.summary,
            "sample_true_nll_bpd": groundtruth.sample_log_density_bpd(mixture, samples),
        }
    )


def evaluate(
    denoiser: Denoiser, datamodule: ArrayDataModule, cfg: DictConfig, out: RunDir
) -> tuple[Evaluation, float]:
    """Every evaluation the config asks for: metrics (complete on rank zero) with their settings,
    and the wall time it took."""
    ev = cfg.eval
    denoiser.net.eval()
    x0 = datamodule.split(ev.split)
    if ev.num_images:
        x0 = x0[: ev.num_images]
    levels = datamodule.num_levels
    start = time.perf_counter()
    result = evaluate_vlb(denoiser, x0, ev, levels, cfg.diffusion.variance, cfg.seed, out)
    if ev.ode_images:
        result.add(**vars(evaluate_ode(denoiser, x0, ev, levels, cfg.seed)))
    quality, samples = evaluate_samples(
        denoiser, datamodule, ev, cfg.sample.variance, cfg.seed, out, cfg.data.name
    )
    result.add(**vars(quality))
    if world()[0] == 0:
        evaluate_eps_profile(denoiser, x0, ev, cfg.seed, out)
        if ev.trajectory_images:
            evaluate_trajectory(denoiser, ev, cfg.sample.variance, datamodule.image_shape, cfg.seed, out)
        if hasattr(datamodule, "mixture"):
            result.add(**vars(evaluate_groundtruth(denoiser, datamodule, x0, samples, cfg, cfg.seed, out)))
        result.add({}, {"baselines": evaluate_baselines(datamodule, x0, ev, cfg.data.name)})
    return result, round(time.perf_counter() - start, 2)
