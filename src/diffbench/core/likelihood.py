"""Terms of the discrete variational bound, in nats per example: KLs of Gaussians, the
discretized-Gaussian decoder L_0 and the prior term L_T (improved-DDPM conventions)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffbench.core.diffusion import NoiseSchedule, VarianceType, elbo_eps_weight, eps_to_x0
from diffbench.core.diffusion import posterior_mean as q_posterior_mean
from diffbench.core.heads import Head


def sum_except_batch(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def nats_to_bpd(nats: Tensor, num_dims: int) -> Tensor:
    """Nats per example → bits per dimension."""
    return nats / (num_dims * math.log(2.0))


def normal_kl(mean1: Tensor, var1: Tensor, mean2: Tensor, var2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, var1) ‖ N(mean2, var2))."""
    return 0.5 * (var2.log() - var1.log() + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor, num_levels: int) -> Tensor:
    """log P(x) for data on `num_levels` evenly spaced values in [−1, 1], each value owning a
    bin of width 2/(L − 1) under N(mean, exp(log_scale)²); the outer bins extend to ±∞."""
    x, mean, log_scale = (v.double() for v in torch.broadcast_tensors(x, mean, log_scale))
    half_bin = 1.0 / (num_levels - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + half_bin) * inv_scale
    lower = (x - mean - half_bin) * inv_scale
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_survival_lower = torch.special.log_ndtr(-lower)
    # log(Φ(u) − Φ(l)) computed on the side of the bell where it does not cancel. The side is
    # chosen before log1p: the other side's ratio can round to 1, and log1p(−1) = −inf would
    # turn the masked branch's zero gradient into NaN.
    right_tail = lower > 0
    log_outer = torch.where(right_tail, log_survival_lower, log_cdf_upper)
    log_inner = torch.where(right_tail, torch.special.log_ndtr(-upper), torch.special.log_ndtr(lower))
    mid = log_outer + torch.log1p(-torch.exp(log_inner - log_outer))
    top = 1 - half_bin
    return torch.where(x < -top, log_cdf_upper, torch.where(x > top, log_survival_lower, mid))


def prior_kl(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x0) ‖ N(0, I)) per example; constant in θ."""
    alpha_bar = schedule.alphas_cumprod[-1]
    x0 = x0.double()
    kl = normal_kl(
        alpha_bar.sqrt() * x0, (1 - alpha_bar).expand_as(x0), torch.zeros_like(x0), torch.ones_like(x0)
    )
    return sum_except_batch(kl)


def vlb_term(
    schedule: NoiseSchedule,
    x0: Tensor,
    xt: Tensor,
    t: Tensor,
    eps_hat: Tensor,
    num_levels: int | None,
    variance: VarianceType = "small",
) -> Tensor:
    """L_{t−1} per example from the model's ε̂: the posterior KL for t ≥ 2 and the decoder
    −log p(x0 | x1) at t = 1 (a discretized Gaussian, or a density when num_levels is None)."""
    c = schedule.coefficients(t, x0.ndim)
    x0, xt, eps_hat = x0.double(), xt.double(), eps_hat.double()
    sigma2 = schedule.at(schedule.reverse_variance(variance), t, x0.ndim)
    x0_hat = eps_to_x0(xt, eps_hat, c["alpha_bar"])
    mean_true = q_posterior_mean(x0, xt, **c)
    mean_model = q_posterior_mean(x0_hat, xt, **c)
    var_true = schedule.at(schedule.posterior_variance, t, x0.ndim).clamp(min=1e-300)
    kl = sum_except_batch(normal_kl(mean_true, var_true.expand_as(x0), mean_model, sigma2.expand_as(x0)))
    return with_decoder_at_first_step(t, kl, x0, mean_model, sigma2, num_levels)


def with_decoder_at_first_step(
    t: Tensor, kl: Tensor, x0: Tensor, mean: Tensor, sigma2: Tensor, num_levels: int | None
) -> Tensor:
    """Replace the rows with t = 1 by the decoder term −log p(x0 | x1); the decoder is evaluated
    on those rows only, since it costs more than the KL of every other row."""
    first = t == 1
    if not bool(first.any()):
        return kl
    out = kl.clone()
    out[first] = -decoder_log_prob(x0[first], mean[first], sigma2[first], num_levels)
    return out


def decoder_log_prob(x0: Tensor, mean: Tensor, sigma2: Tensor, num_levels: int | None) -> Tensor:
    """log p(x0 | x1) summed per example."""
    log_scale = 0.5 * sigma2.log().expand_as(x0)
    if num_levels is None:
        dist = torch.distributions.Normal(mean, log_scale.exp())
        return sum_except_batch(dist.log_prob(x0))
    return sum_except_batch(discretized_gaussian_log_prob(x0, mean, log_scale, num_levels))


def elbo_loss_term(
    head: Head,
    schedule: NoiseSchedule,
    output: Tensor,
    target: Tensor,
    x0: Tensor,
    xt: Tensor,
    t: Tensor,
    num_levels: int | None,
    variance: VarianceType = "small",
) -> Tensor:
    """L_{t−1} per example written as the head's own weighted squared error (the ELBO's ε-weight
    times the head's ε-space factor) plus the θ-independent variance mismatch; equals `vlb_term`
    for the implied ε̂ (a test checks)."""
    c = schedule.coefficients(t, x0.ndim)
    sigma2 = schedule.at(schedule.reverse_variance(variance), t, x0.ndim)
    weight = elbo_eps_weight(c["beta"], c["alpha"], c["alpha_bar"], sigma2) * head.eps_factor(c["alpha_bar"])
    squared_error = sum_except_batch((target.double() - output.double()) ** 2)
    var_true = schedule.at(schedule.posterior_variance, t, x0.ndim).clamp(min=1e-300)
    mismatch = 0.5 * (sigma2.log() - var_true.log() + var_true / sigma2 - 1)
    kl = weight.flatten() * squared_error + mismatch.flatten() * x0[0].numel()
    eps_hat = head.to_eps(output.double(), xt.double(), c["alpha_bar"])
    x0_hat = eps_to_x0(xt.double(), eps_hat, c["alpha_bar"])
    return with_decoder_at_first_step(t, kl, x0.double(), x0_hat, sigma2, num_levels)
