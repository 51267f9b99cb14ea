"""Metrics that need the true data density, so only the `gmm` dataset allows them.

On gmm every diffused marginal q_t is a known Gaussian mixture (diffbench.data.gmm), so the
NLL of test data is exact rather than bounded, the optimal ε-prediction ε* is known at every t,
and generated samples can be scored under the truth. Each metric is a pure function of its
arguments; densities are continuous on the data's [−1, 1] scale, so bits/dim can be negative.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffbench.core.diffusion import NoiseSchedule, q_sample
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
