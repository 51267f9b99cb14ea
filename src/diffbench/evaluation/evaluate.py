"""Evaluation that makes the arms comparable: NLL as the discrete VLB and through the
probability-flow ODE, sample-quality metrics, x̂0 trajectories, and on `gmm` the ground truth.

`python -m diffbench.evaluate run_dir=… [sampler=ddim steps=100 …]` evaluates a finished run
again; `diffbench.run` calls `evaluate` after training. Every metric is recorded with the
settings (sampler, steps, sample count, timesteps) that produced it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffbench.core.diffusion import VarianceType, q_sample
from diffbench.core.heads import Denoiser
from diffbench.data.base import ArrayDataModule
from diffbench.evaluation import groundtruth
from diffbench.evaluation.baselines import evaluate_baselines
from diffbench.evaluation.distributed import gather_rows, generator_for, world
from diffbench.evaluation.fidelity import datamodule_scorer
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
)
from diffbench.sampling import nll, samplers
from diffbench.spec import EvalSpec, RunSpec, SamplerSpec

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
    ev: EvalSpec,
    num_levels: int | None,
    variance: VarianceType,
    seed: int,
    out: RunDir,
) -> Evaluation:
    """nll_vlb_bpd over the evaluation images: all T terms, or a stratified estimate."""
    rank, size = world()
    generator = generator_for(seed, "vlb", denoiser.device)
    num_timesteps = denoiser.schedule.num_timesteps
    timesteps = weights = None
    shard = x0[rank::size].to(denoiser.device)
    if ev.vlb_timesteps:
        timesteps = nll.stratified_timesteps(num_timesteps, ev.vlb_timesteps, generator, batch=len(shard))
        weights = nll.stratified_weights(num_timesteps, ev.vlb_timesteps)
    start = time.perf_counter()
    result = nll.vlb_bpd(
        denoiser,
        denoiser.schedule,
        shard,
        num_levels,
        generator,
        variance=variance,
        timesteps=timesteps,
        batch_timesteps=ev.vlb_batch_timesteps,
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
        else f"stratified-{ev.vlb_timesteps}, drawn per image, plus the decoder term (t = 1)",
        "variance": variance,
        "num_images": len(x0),
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    return Evaluation({"nll_vlb_bpd": mean, "nll_vlb_bpd_stderr": stderr}, {"nll_vlb_settings": settings})


def evaluate_eps_profile(denoiser: Denoiser, x0: Tensor, ev: EvalSpec, seed: int, out: RunDir) -> None:
    """Mean ‖ε − ε̂‖²/D at `profile_timesteps` log-spaced t: the measured counterpart of each
    arm's implied ε-space weight (rank zero, first 256 images)."""
    device, schedule = denoiser.device, denoiser.schedule
    x0 = x0[:256].to(device)
    T = schedule.num_timesteps
    steps = torch.unique(
        torch.logspace(0, torch.log10(torch.tensor(float(T))), ev.profile_timesteps).round().long()
    )
    generator = generator_for(seed, "eps_profile", device)
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
    denoiser: Denoiser, x0: Tensor, ev: EvalSpec, num_levels: int | None, seed: int
) -> Evaluation:
    """nll_ode_bpd on the first `ode_images` evaluation images."""
    rank, size = world()
    x0 = x0[: ev.ode_images]
    start = time.perf_counter()
    result = nll.ode_nll_bpd(
        denoiser,
        denoiser.schedule,
        x0[rank::size].to(denoiser.device),
        num_levels,
        generator_for(seed, "ode", denoiser.device),
        rtol=ev.ode_rtol,
        atol=ev.ode_atol,
        progress=rank == 0,
    )
    mean, stderr = nll.mean_and_stderr(gather_rows(result.bpd.cpu(), len(x0)))
    settings = {
        "rtol": ev.ode_rtol,
        "atol": ev.ode_atol,
        "num_images": len(x0),
        "nfe": result.nfe,
        "dequantization": "uniform" if num_levels else "none (continuous data)",
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    return Evaluation({"nll_ode_bpd": mean, "nll_ode_bpd_stderr": stderr}, {"nll_ode_settings": settings})


def sampler_options(ev: EvalSpec) -> samplers.SamplerOptions:
    """The evaluation's settings that samplers read beside their step counts."""
    return samplers.SamplerOptions(
        ev.ddim_eta, ev.ancestral_variance, ev.ode_method, ev.ode_rtol, ev.ode_atol
    )


def draw(
    denoiser: Denoiser, ev: EvalSpec, sampler: SamplerSpec, shape: tuple[int, ...], seed: int
) -> tuple[Tensor, dict]:
    """`num_samples` samples split across ranks (rank r draws r, r + W, …), each rank with its
    own generator; gathered so every sample exists exactly once. Every sampler starts from the same
    seeded stream, so two samplers of one run begin at the same noise. Returns the samples and the
    record of how they were drawn (sampler, its settings, network evaluations per batch)."""
    rank, size = world()
    count = len(range(rank, ev.num_samples, size))
    generator = generator_for(seed, "samples", denoiser.device)
    settings = samplers.SAMPLERS[sampler.name].settings(sampler.steps, sampler_options(ev))
    pieces, nfe = [], 0
    for start in range(0, count, ev.sample_batch_size):
        n = min(ev.sample_batch_size, count - start)
        result = samplers.sample(
            sampler.name,
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
    return gather_rows(local, ev.num_samples), {"sampler": sampler.name, **settings, "nfe_per_batch": nfe}


def metrics_of(quality: dict) -> dict[str, float]:
    return {k: v for k, v in quality.items() if isinstance(v, float) and k not in EXTRACTOR_FIELDS}


def evaluate_samples(
    denoiser: Denoiser, datamodule: ArrayDataModule, spec: RunSpec, out: RunDir
) -> tuple[Evaluation, Tensor]:
    """The sample metrics with the configured sampler (and its split-half evaluation noise), and
    again with each of `eval.also_samplers` under `<metric>@<sampler>-<steps>`, so a verdict on
    samples can be read along the number of network evaluations."""
    ev, shape = spec.evaluation, datamodule.image_shape
    start = time.perf_counter()
    samples, record = draw(denoiser, ev, ev.sampler, shape, spec.seed)
    record.update(num_samples=len(samples), wall_time_s=round(time.perf_counter() - start, 2))
    variants = [(sampler, *draw(denoiser, ev, sampler, shape, spec.seed)) for sampler in ev.also_samplers]
    if world()[0] != 0:
        return Evaluation(), samples
    save_grid(samples[:64], out / sample_grid(ev.sampler.name), nrow=8)
    score = datamodule_scorer(datamodule, spec.data.name, ev.reference_split, ev.inception_weights)
    quality = score(samples)
    metrics = metrics_of(quality)
    record.update({k: v for k, v in quality.items() if k not in metrics})
    record["reference"] = f"{ev.reference_split} split ({len(datamodule.split(ev.reference_split))} images)"
    record["evaluation_noise"] = split_half_scores(samples, score)
    result = Evaluation(metrics, {"sample_settings": record})
    for sampler, drawn, variant_record in variants:
        result.add(
            {metric_at(k, sampler.tag): v for k, v in metrics_of(score(drawn)).items()},
            {f"sample_settings{AT}{sampler.tag}": variant_record},
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
    ev: EvalSpec,
    variance: VarianceType,
    shape: tuple[int, ...],
    seed: int,
    out: RunDir,
) -> None:
    """Rows: images; columns: the model's x̂0 from t = T (left) to t = 1 (right)."""
    trajectory = samplers.x0_trajectory(
        denoiser,
        denoiser.schedule,
        (ev.trajectory_images, *shape),
        generator_for(seed, "trajectory", denoiser.device),
        num_snapshots=10,
        variance=variance,
        steps=ev.trajectory_steps or None,
    )
    grid = trajectory.x0_hats.transpose(0, 1).reshape(-1, *shape)
    save_grid(grid, out / X0_TRAJECTORY, nrow=trajectory.x0_hats.shape[0])


def evaluate_groundtruth(
    denoiser: Denoiser,
    datamodule: ArrayDataModule,
    x0: Tensor,
    samples: Tensor,
    spec: RunSpec,
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
        generator_for(spec.seed, "groundtruth", device),
        spec.diffusion.variance,
        count=spec.evaluation.gmm_timesteps,
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
    denoiser: Denoiser, datamodule: ArrayDataModule, spec: RunSpec, out: RunDir
) -> tuple[Evaluation, float]:
    """Every evaluation the spec asks for: metrics (complete on rank zero) with their settings,
    and the wall time it took."""
    ev, seed = spec.evaluation, spec.seed
    denoiser.net.eval()
    x0 = datamodule.split(ev.split)
    if ev.num_images:
        x0 = x0[: ev.num_images]
    levels = datamodule.num_levels
    start = time.perf_counter()
    result = evaluate_vlb(denoiser, x0, ev, levels, spec.diffusion.variance, seed, out)
    if ev.ode_images:
        result.add(**vars(evaluate_ode(denoiser, x0, ev, levels, seed)))
    quality, samples = evaluate_samples(denoiser, datamodule, spec, out)
    result.add(**vars(quality))
    if world()[0] == 0:
        evaluate_eps_profile(denoiser, x0, ev, seed, out)
        if ev.trajectory_images:
            evaluate_trajectory(denoiser, ev, ev.ancestral_variance, datamodule.image_shape, seed, out)
        if hasattr(datamodule, "mixture"):
            result.add(**vars(evaluate_groundtruth(denoiser, datamodule, x0, samples, spec, out)))
        result.add({}, {"baselines": evaluate_baselines(datamodule, x0, ev, spec.data.name)})
    return result, round(time.perf_counter() - start, 2)
