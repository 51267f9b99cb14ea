"""The discrete DDPM process in one place: schedules, marginals, posterior and the exact
conversions between ε, x0, score and v (docs/math.md is the specification).

Timesteps run t = 1..T and every table is indexed by t directly: entry 0 holds t = 0
(ᾱ_0 = 1, β_0 = 0), so code reads like the formulas. Coefficients are float64.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

VarianceType = Literal["small", "large"]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear β_1..β_T, rescaled so T ≠ 1000 keeps the same total noise."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64).clamp(
        max=0.999
    )


def cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Improved DDPM's cosine schedule: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s)·π/2)."""
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + offset) / (1 + offset) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


def make_betas(name: str, num_timesteps: int) -> Tensor:
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_timesteps)


class NoiseSchedule(nn.Module):
    """Precomputed float64 tables of one β schedule, as buffers so they follow the device."""

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    posterior_variance: Tensor

    def __init__(self, name: str = "linear", num_timesteps: int = 1000) -> None:
        super().__init__()
        self.name = name
        self.num_timesteps = num_timesteps
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), make_betas(name, num_timesteps)])
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.register_buffer("betas", betas)
        self.register_buffer("alphas", alphas)
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.register_buffer("alphas_cumprod_prev", alphas_cumprod_prev)
        self.register_buffer(
            "posterior_variance", posterior_variance(betas, alphas_cumprod, alphas_cumprod_prev)
        )

    def at(self, table: Tensor, t: Tensor, ndim: int) -> Tensor:
        """table[t] shaped (B, 1, …, 1) to broadcast against a batch of `ndim` dimensions."""
        return table[t.long()].reshape(-1, *([1] * (ndim - 1)))

    def reverse_variance(self, variance: VarianceType) -> Tensor:
        """σ_t² of p_θ(x_{t−1}|x_t); entry t = 1 takes β̃_2 as in improved DDPM (β̃_1 = 0)."""
        table = self.betas if variance == "large" else self.posterior_variance
        return torch.cat([table[:1], self.posterior_variance[2:3], table[2:]])

    def alpha_bar_continuous(self, t: Tensor) -> Tensor:
        """ᾱ(t) for real t ∈ [0, T]: log ᾱ interpolated linearly between the table's entries,
        so continuous-time samplers and the ODE see the same marginals as the discrete chain."""
        log_table = self.alphas_cumprod.log()
        t = t.double().clamp(0, self.num_timesteps)
        lower = t.floor().long().clamp(max=self.num_timesteps - 1)
        return torch.lerp(log_table[lower], log_table[lower + 1], t - lower).exp()

    def beta_continuous(self, t: Tensor) -> Tensor:
        """β(t) = −d log ᾱ/dt of that interpolation (per unit of t): −log α_k on (k−1, k]."""
        step = t.double().ceil().long().clamp(1, self.num_timesteps)
        return -self.alphas[step].log()

    def log_snr_continuous(self, t: Tensor) -> Tensor:
        """λ(t) = log(ᾱ/(1 − ᾱ)) of `alpha_bar_continuous`, decreasing in t (+∞ at t = 0): the time
        in which the probability-flow ODE is smooth. expm1 keeps 1 − ᾱ exact where ᾱ ≈ 1."""
        log_alpha_bar = self.alpha_bar_continuous(t).log()
        return log_alpha_bar - torch.log(-torch.expm1(log_alpha_bar))

    def t_of_log_snr(self, log_snr: Tensor) -> Tensor:
        """The real t ∈ [0, T] with `log_snr_continuous(t)` = λ, so a network fed its own time units
        can be asked at any λ: log ᾱ = log sigmoid(λ), then inverted on the same linear segment of
        the log ᾱ table that `alpha_bar_continuous` interpolates."""
        log_table = self.alphas_cumprod.log()
        log_alpha_bar = torch.nn.functional.logsigmoid(log_snr.double())
        # −log ᾱ increases with t, as searchsorted needs; upper is the segment's right end.
        upper = torch.searchsorted(-log_table, -log_alpha_bar).clamp(1, self.num_timesteps)
        lower = upper - 1
        fraction = (log_alpha_bar - log_table[lower]) / (log_table[upper] - log_table[lower])
        return (lower + fraction).clamp(0, self.num_timesteps)

    def coefficients(self, t: Tensor, ndim: int) -> dict[str, Tensor]:
        """β_t, α_t, ᾱ_t and ᾱ_{t−1} for a batch of timesteps, broadcastable to the data."""
        return {
            "beta": self.at(self.betas, t, ndim),
            "alpha": self.at(self.alphas, t, ndim),
            "alpha_bar": self.at(self.alphas_cumprod, t, ndim),
            "alpha_bar_prev": self.at(self.alphas_cumprod_prev, t, ndim),
        }


def snr(alpha_bar: Tensor) -> Tensor:
    """Signal-to-noise ratio ᾱ/(1 − ᾱ)."""
    return alpha_bar / (1 - alpha_bar)


def q_sample(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """Draw x_t ~ q(x_t | x0) = N(√ᾱ x0, (1 − ᾱ) I) with the given noise."""
    return alpha_bar.sqrt().to(x0.dtype) * x0 + (1 - alpha_bar).sqrt().to(x0.dtype) * eps


def posterior_variance(beta: Tensor, alpha_bar: Tensor, alpha_bar_prev: Tensor) -> Tensor:
    """β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t (zero at t = 1)."""
    return torch.where(alpha_bar < 1, (1 - alpha_bar_prev) / (1 - alpha_bar) * beta, 0.0)


def posterior_mean(
    x0: Tensor, xt: Tensor, beta: Tensor, alpha: Tensor, alpha_bar: Tensor, alpha_bar_prev: Tensor
) -> Tensor:
    """μ̃_t(x_t, x0), the mean of q(x_{t−1} | x_t, x0)."""
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)
    coef_xt = alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
    return coef_x0 * x0 + coef_xt * xt


def eps_to_x0(xt: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    return (xt - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def x0_to_eps(xt: Tensor, x0: Tensor, alpha_bar: Tensor) -> Tensor:
    return (xt - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def eps_to_score(eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """Tweedie: the optimal ε̂ gives ∇log q_t(x_t) = −ε̂ / √(1 − ᾱ_t)."""
    return -eps / (1 - alpha_bar).sqrt()


def score_to_eps(score: Tensor, alpha_bar: Tensor) -> Tensor:
    return -(1 - alpha_bar).sqrt() * score


def v_target(x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """v = √ᾱ ε − √(1 − ᾱ) x0 (Salimans & Ho 2022): the velocity of x_t along the circle in (x0, ε)."""
    return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0


def v_to_eps(xt: Tensor, v: Tensor, alpha_bar: Tensor) -> Tensor:
    """ε̂ = √ᾱ v̂ + √(1 − ᾱ) x_t, exact since x_t = √ᾱ x0 + √(1 − ᾱ) ε."""
    return alpha_bar.sqrt() * v + (1 - alpha_bar).sqrt() * xt


def elbo_eps_weight(beta: Tensor, alpha: Tensor, alpha_bar: Tensor, sigma2: Tensor) -> Tensor:
    """The ELBO's weight on ‖ε − ε̂‖² (t ≥ 2): L_{t−1} = w ‖ε − ε̂‖² + const, any σ_t²; with
    σ_t² = β̃_t it is ½(SNR_{t−1}/SNR_t − 1). Every head's ELBO is this times its ε-space factor."""
    return beta**2 / (2 * sigma2 * alpha * (1 - alpha_bar))


def elbo_weight_at(schedule: NoiseSchedule, t: Tensor, variance: VarianceType) -> Tensor:
    """The ELBO's ε-space weight at integer t under the schedule (σ_t² from `variance`)."""
    sigma2 = schedule.reverse_variance(variance)[t]
    return elbo_eps_weight(schedule.betas[t], schedule.alphas[t], schedule.alphas_cumprod[t], sigma2)


def elbo_proposal(schedule: NoiseSchedule, variance: VarianceType, first: int) -> Tensor:
    """p(t) ∝ the ELBO's ε-space weight on t = first..T: where the bound's terms are large, so an
    importance-sampled VLB (in training, elbo_is; in validation, from t = 2) has little spread."""
    steps = torch.arange(first, schedule.num_timesteps + 1, device=schedule.betas.device)
    weight = elbo_weight_at(schedule, steps, variance)
    return weight / weight.sum()


def importance_timesteps(
    probs: Tensor, batch: int, generator: torch.Generator, first: int = 2
) -> tuple[Tensor, Tensor]:
    """`batch` timesteps t = first, first + 1, … with P(t) = probs[t − first], and those
    probabilities. Inverse CDF of evenly spread uniforms (U + π(i)/B) mod 1: each draw has exactly
    that marginal, and every stretch of the distribution gets its share of the batch to within one."""
    device = generator.device
    offset = torch.rand(1, generator=generator, dtype=torch.float64, device=device)
    order = torch.randperm(batch, generator=generator, device=device).double()
    cdf = torch.cumsum(probs.double().to(device), 0)
    index = torch.searchsorted(cdf, (offset + order / batch) % 1, right=True).clamp(max=len(probs) - 1)
    return index + first, probs.to(device)[index]
