"""Metrics that need the true data density, so only the `gmm` dataset allows them.

On gmm every diffused marginal q_t is a known Gaussian mixture (diffbench.data.gmm), so the
NLL of test data is exact rather than bounded, the optimal ε-prediction ε* is known at every t,
and generated samples can be scored under the truth. Each metric is a pure function of its
arguments; densities are continuous on the data's [−1, 1] scale, so bits/dim can be negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffbench.core.diffusion import NoiseSchedule, VarianceType, q_sample, snr
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.data.gmm import DiffusedMixture
from diffbench.sampling.samplers import EpsFn


def exact_nll_bpd(mixture: DiffusedMixture, x0: Tensor) -> Tensor:
    """−log q_0(x0) / (D ln 2) per example, (B,): the value every NLL estimator should bracket."""
    return -mixture.log_prob(x0, 1.0) / (mixture.dim * math.log(2))


def sample_log_density_bpd(mixture: DiffusedMixture, samples: Tensor) -> float:
    """Mean true −log q_0 of generated samples in bits/dim: low means the samples sit where the truth
    puts mass. It says nothing about coverage (a sampler stuck on one mode can score well)."""
    return exact_nll_bpd(mixture, samples).mean().item()


@torch.no_grad()
def eps_star_distance(
    eps_fn: EpsFn,
    mixture: DiffusedMixture,
    schedule: NoiseSchedule,
    x0: Tensor,
    timesteps: Tensor,
    generator: torch.Generator,
    max_batch: int = 4096,
) -> Tensor:
    """Per timestep, E‖ε̂(x_t, t) − ε*(x_t, t)‖² / D over x_t ~ q(x_t | x0), shape (len(timesteps),).

    ε* = E[ε | x_t] is what every head converges to with unlimited capacity and data, so this is
    the part of the model's ε-error that training could still remove (the rest, ‖ε − ε*‖², is
    irreducible). ε* is evaluated at exactly the float32 x_t the model sees. Several timesteps
    share one call of `eps_fn` as long as their rows fit in `max_batch`. Returned as float64 on CPU.
    """
    alphas_cumprod = schedule.alphas_cumprod.to(x0.device, torch.float64)
    mixture = mixture.to(x0.device)
    clean = x0.to(torch.float64)
    batch, dim = len(x0), x0[0].numel()
    per_call = max(1, max_batch // batch)
    distances = []
    for chunk in timesteps.long().split(per_call):
        t = chunk.to(x0.device).repeat_interleave(batch)
        alpha_bar = alphas_cumprod[t].reshape(-1, *([1] * (x0.dim() - 1)))
        noise = torch.randn(
            (len(t), *x0.shape[1:]), generator=generator, dtype=torch.float64, device=generator.device
        ).to(x0.device)
        xt = q_sample(clean.repeat(len(chunk), *([1] * (x0.dim() - 1))), noise, alpha_bar).float()
        eps_hat = eps_fn(xt, t).to(torch.float64)
        eps_star = mixture.eps_star(xt, alpha_bar.reshape(-1))
        squared = (eps_hat - eps_star).reshape(len(chunk), batch, dim).pow(2).sum(-1) / dim
        distances.append(squared.mean(1))
    return torch.cat(distances).cpu()


def logsnr_timesteps(schedule: NoiseSchedule, count: int) -> tuple[Tensor, Tensor]:
    """About `count` distinct integer t evenly spread in log SNR (where the weightings differ),
    and how many of t = 1..T each stands for (its cell between midpoints), so Σ_t f(t) ≈
    Σ_k width_k f(t_k)."""
    log_snr = snr(schedule.alphas_cumprod[1:].cpu()).log()
    grid = torch.linspace(float(log_snr[0]), float(log_snr[-1]), count, dtype=torch.float64)
    t = torch.unique((log_snr[None, :] - grid[:, None]).abs().argmin(1) + 1)
    edges = torch.cat([torch.tensor([0.5]), (t[1:] + t[:-1]).double() / 2, torch.tensor([t[-1] + 0.5])])
    edges[-1] = schedule.num_timesteps + 0.5
    width = edges[1:].ceil() - edges[:-1].ceil()
    return t, width


@dataclass(frozen=True)
class EpsStarProfile:
    """E‖ε̂ − ε*‖²/D at log-SNR-spaced t, and its two summaries."""

    timesteps: Tensor
    distance: Tensor
    summary: dict[str, float]


def eps_star_summary(
    eps_fn: EpsFn,
    mixture: DiffusedMixture,
    schedule: NoiseSchedule,
    x0: Tensor,
    generator: torch.Generator,
    variance: VarianceType = "small",
    count: int = 20,
) -> EpsStarProfile:
    """The model's distance to the optimal ε*, plain (mean over log-SNR-spaced t) and weighted by
    the ELBO (Σ_t w_ε(t)·E‖ε̂ − ε*‖², in bits/dim): the reducible part of the bound's t ≥ 2 terms,
    which is zero exactly when the model is the optimum."""
    t, width = logsnr_timesteps(schedule, count)
    distance = eps_star_distance(eps_fn, mixture, schedule, x0, t.to(x0.device), generator)
    weight = (
        WEIGHTINGS["elbo"].eps_weight(HEADS["eps"], schedule, t.to(schedule.betas.device), variance).cpu()
    )
    keep = t >= 2
    elbo_bpd = (width * weight * distance)[keep].sum() / math.log(2)
    summary = {"eps_star_mse": float(distance.mean()), "eps_star_elbo_bpd": float(elbo_bpd)}
    return EpsStarProfile(t, distance, summary)
