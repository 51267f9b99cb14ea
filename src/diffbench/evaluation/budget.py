"""The cheap metrics a run records at every training budget (250, 500, 1000, … steps and the
last), so verdicts can be read along the budget without retraining: the importance-sampled
validation VLB, the validation ε-MSE, a small-sample feature distance and, on gmm, the distance
to ε*. Every budget uses the same seeded noise, so changes along steps are the model's."""

from __future__ import annotations

import time

import torch

from diffbench.core.diffusion import q_sample
from diffbench.core.heads import Denoiser
from diffbench.data.base import ArrayDataModule
from diffbench.evaluation.distributed import generator_for
from diffbench.evaluation.fidelity import datamodule_scorer
from diffbench.evaluation.groundtruth import eps_star_summary
from diffbench.rundir import METRIC_INFO
from diffbench.sampling import samplers
from diffbench.sampling.nll import importance_vlb_bpd
from diffbench.spec import RunSpec


def budget_steps(max_steps: int, base: int) -> list[int]:
    """base · 2^k below max_steps, then max_steps: log-spaced, so 'has the curve flattened' reads
    as the change over the last doubling. base 0 means the final budget only."""
    steps = []
    budget = base
    while 0 < budget < max_steps:
        steps.append(budget)
        budget *= 2
    return [*steps, max_steps]


@torch.no_grad()
def budget_metrics(denoiser: Denoiser, datamodule: ArrayDataModule, spec: RunSpec) -> dict[str, float]:
    """The cheap metrics of the denoiser as it is now (rank zero; draws only from its own
    generators, so training's random stream is untouched)."""
    start = time.perf_counter()
    ev, device, schedule = spec.evaluation, denoiser.device, denoiser.schedule
    x0 = datamodule.split("val").to(device)
    generator = generator_for(spec.seed, "budget", device)
    levels, variance = datamodule.num_levels, spec.diffusion.variance
    metrics = {
        "val_vlb_bpd": float(importance_vlb_bpd(denoiser, schedule, x0, levels, generator, variance).mean())
    }
    t = torch.randint(1, schedule.num_timesteps + 1, (len(x0),), generator=generator, device=device)
    eps = torch.randn(x0.shape, generator=generator, device=device)
    xt = q_sample(x0.double(), eps.double(), schedule.at(schedule.alphas_cumprod, t, x0.ndim)).float()
    metrics["val_eps_mse"] = float((denoiser(xt, t) - eps).pow(2).mean())
    if ev.budget_samples:
        shape = (ev.budget_samples, *datamodule.image_shape)
        samples = samplers.sample(
            "ddim",
            denoiser,
            schedule,
            shape,
            generator,
            steps=min(ev.budget_sampler_steps, schedule.num_timesteps),
        ).samples
        quality = datamodule_scorer(datamodule, spec.data.name, ev.reference_split, ev.inception_weights)(
            samples
        )
        metrics.update({k: float(v) for k, v in quality.items() if k in METRIC_INFO})
    if hasattr(datamodule, "mixture"):
        metrics.update(
            eps_star_summary(denoiser, datamodule.mixture, schedule, x0, generator, variance).summary
        )
    metrics["wall_time_s"] = round(time.perf_counter() - start, 2)
    return metrics
