"""Samplers over a denoiser callable (x_t, t) → ε̂: they never know which head made ε̂."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffbench.diffusion import NoiseSchedule, VarianceType, eps_to_x0, posterior_mean

EpsFn = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def ddpm_ancestral(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    variance: VarianceType = "large",
    clip_x0: bool = True,
    progress: bool = False,
) -> Tensor:
    """DDPM's sampler: x_{t−1} ~ N(μ̃_t(x_t, x̂0), σ_t²) from t = T down to 1, no noise at the end.
    Clipping x̂0 to the data range is the usual choice for sample quality."""
    device = schedule.betas.device
    x = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
    sigma2 = schedule.reverse_variance(variance)
    steps = range(schedule.num_timesteps, 0, -1)
    for step in tqdm(steps, desc="sampling", disable=not progress, leave=False):
        t = torch.full((shape[0],), step, device=device, dtype=torch.long)
        c = schedule.coefficients(t, len(shape))
        eps_hat = eps_fn(x.float(), t).double()
        x0_hat = eps_to_x0(x, eps_hat, c["alpha_bar"])
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        mean = posterior_mean(x0_hat, x, **c)
        if step > 1:
            noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float64)
            x = mean + sigma2[step].sqrt() * noise
        else:
            x = mean
    return x.float()
