"""Terms of the variational bound in `diffbench.likelihood` against torch.distributions, scipy
and the Gaussians written out by hand; the three heads' ELBO losses against each other."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm
from torch import Tensor
from torch.distributions import Normal, kl_divergence

from diffbench.core.diffusion import NoiseSchedule, VarianceType
from diffbench.core.heads import HEADS
from diffbench.core.likelihood import (
    discretized_gaussian_log_prob,
    elbo_loss_term,
    nats_to_bpd,
    prior_kl,
    vlb_term,
)
from test_diffusion import (
    DTYPE,
    SCHEDULE_NAMES,
    T,
    column,
    outputs_for_eps_hat,
    random_batch,
    reference_alpha_bars,
    reference_betas,
)

LEVELS = 17
VARIANCES: tuple[VarianceType, ...] = ("small", "large")


def hand_targets(b: dict[str, Tensor]) -> dict[str, Tensor]:
    alpha_bar = b["alpha_bar"]
    return {
        "eps": b["eps"],
        "x0": b["x0"],
        "score": -b["eps"] / (1 - alpha_bar).sqrt(),
        "v": alpha_bar.sqrt() * b["eps"] - (1 - alpha_bar).sqrt() * b["x0"],
    }


def reverse_kl_by_hand(b: dict[str, Tensor], ts: list[int], name: str, variance: VarianceType) -> Tensor:
    """KL(q(x_{t−1}|x_t,x0) ‖ p_θ(x_{t−1}|x_t)) per example via torch.distributions, t ≥ 2."""
    betas = reference_betas(name)
    alpha_bars = reference_alpha_bars(betas)
    ndim = b["x0"].ndim
    beta = column([betas[t - 1] for t in ts], ndim)
    alpha = 1 - beta
    alpha_bar = column([alpha_bars[t] for t in ts], ndim)
    alpha_bar_prev = column([alpha_bars[t - 1] for t in ts], ndim)
    posterior_var = (1 - alpha_bar_prev) / (1 - alpha_bar) * beta
    posterior_mean = (
        alpha_bar_prev.sqrt() * beta / (1 - alpha_bar) * b["x0"]
        + alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar) * b["xt"]
    )
    model_mean = (b["xt"] - beta / (1 - alpha_bar).sqrt() * b["eps_hat"]) / alpha.sqrt()
    model_var = posterior_var if variance == "small" else beta
    q = Normal(posterior_mean, posterior_var.sqrt().expand_as(posterior_mean))
    p = Normal(model_mean, model_var.sqrt().expand_as(model_mean))
    return kl_divergence(q, p).flatten(1).sum(1)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("source", ["eps", "x0", "score"])
def test_elbo_of_every_head_is_the_reverse_kl(name: str, variance: VarianceType, source: str) -> None:
    """A random output of head `source`, converted by hand to ε̂ and to the other heads'
    outputs: every head's ELBO loss, `vlb_term` and the KL of the two Gaussians agree."""
    ts = [2, 3, 20, 100, 500, 999, T]
    b = random_batch(10, ts, name)
    alpha_bar = b["alpha_bar"]
    raw = b["eps_hat"] * 0.8 + 0.1
    b["eps_hat"] = {
        "eps": raw,
        "x0": (b["xt"] - alpha_bar.sqrt() * raw) / (1 - alpha_bar).sqrt(),
        "score": -(1 - alpha_bar).sqrt() * raw,
    }[source]
    schedule = NoiseSchedule(name, T)
    t = torch.tensor(ts)
    expected = reverse_kl_by_hand(b, ts, name, variance)
    assert (expected > 0).all()
    vlb = vlb_term(schedule, b["x0"], b["xt"], t, b["eps_hat"], LEVELS, variance)
    torch.testing.assert_close(vlb, expected, rtol=1e-5, atol=0)
    outputs, targets = outputs_for_eps_hat(b), hand_targets(b)
    torch.testing.assert_close(outputs[source], raw, rtol=1e-9, atol=1e-9)
    for key, head in HEADS.items():
        loss = elbo_loss_term(
            head, schedule, outputs[key], targets[key], b["x0"], b["xt"], t, LEVELS, variance
        )
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("key", HEADS)
def test_elbo_gradient_is_finite_for_poor_outputs(key: str) -> None:
    """The t = 1 decoder is evaluated for the whole batch and masked; an x̂0 far from x0 must
    not turn the masked branch's zero gradient into NaN for every t."""
    ts = [1, 2, 300, T]
    b = random_batch(13, ts)
    b["x0"] = (b["x0"] * 8).round() / 8
    output = (outputs_for_eps_hat(b)[key] * 3).requires_grad_(True)
    t = torch.tensor(ts)
    schedule = NoiseSchedule("linear", T)
    target = hand_targets(b)[key]
    loss = elbo_loss_term(HEADS[key], schedule, output, target, b["x0"], b["xt"], t, LEVELS)
    (gradient,) = torch.autograd.grad(loss.sum(), output)
    assert torch.isfinite(loss).all() and torch.isfinite(gradient).all()
    assert (gradient[1:].flatten(1).abs().sum(1) > 0).all()


def decoder_batch(name: str) -> dict[str, Tensor]:
    """t = 1 with data on 17 levels (both ends included) and x̂0 = x0 + δ, |δ| ≤ 0.07."""
    generator = torch.Generator().manual_seed(11)
    shape = (6, 1, 4, 4)
    x0 = torch.randint(0, LEVELS, shape, generator=generator).to(DTYPE) / 8 - 1
    x0[0, 0, 0] = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=DTYPE)
    x0_hat = x0 + (torch.rand(shape, generator=generator, dtype=DTYPE) * 2 - 1) * 0.07
    x0_hat[0, 0, 0] = x0[0, 0, 0] + torch.tensor([0.05, -0.05, 0.05, -0.05], dtype=DTYPE)
    alpha_bar = torch.full((6, 1, 1, 1), reference_alpha_bars(reference_betas(name))[1], dtype=DTYPE)
    eps = torch.randn(shape, generator=generator, dtype=DTYPE)
    xt = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    eps_hat = (xt - alpha_bar.sqrt() * x0_hat) / (1 - alpha_bar).sqrt()
    return {
        "x0": x0,
        "x0_hat": x0_hat,
        "eps": eps,
        "eps_hat": eps_hat,
        "xt": xt,
        "alpha_bar": alpha_bar,
    }


def clipped_decoder_std(name: str) -> float:
    """√β̃_2: the decoder's σ at t = 1 for either variance choice (improved DDPM)."""
    betas = reference_betas(name)
    alpha_bars = reference_alpha_bars(betas)
    return math.sqrt((1 - alpha_bars[1]) / (1 - alpha_bars[2]) * betas[1])


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("variance", VARIANCES)
def test_t1_term_is_discretized_gaussian_decoder(name: str, variance: VarianceType) -> None:
    b = decoder_batch(name)
    schedule = NoiseSchedule(name, T)
    t = torch.ones(6, dtype=torch.long)
    dist = Normal(b["x0_hat"], clipped_decoder_std(name))
    half_bin = 1 / (LEVELS - 1)
    cdf_upper = torch.where(b["x0"] > 0.999, 1.0, dist.cdf(b["x0"] + half_bin))
    cdf_lower = torch.where(b["x0"] < -0.999, 0.0, dist.cdf(b["x0"] - half_bin))
    expected = -(cdf_upper - cdf_lower).log().flatten(1).sum(1)
    assert (expected > 0.1).all()
    vlb = vlb_term(schedule, b["x0"], b["xt"], t, b["eps_hat"], LEVELS, variance)
    torch.testing.assert_close(vlb, expected, rtol=1e-9, atol=0)
    outputs, targets = outputs_for_eps_hat(b), hand_targets(b)
    for key, head in HEADS.items():
        loss = elbo_loss_term(
            head, schedule, outputs[key], targets[key], b["x0"], b["xt"], t, LEVELS, variance
        )
        torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("variance", VARIANCES)
def test_t1_term_for_continuous_data_is_gaussian_density(variance: VarianceType) -> None:
    b = decoder_batch("linear")
    std = clipped_decoder_std("linear")
    z = (b["x0"] - b["x0_hat"]) / std
    expected = (0.5 * z**2 + math.log(std) + 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    t = torch.ones(6, dtype=torch.long)
    vlb = vlb_term(NoiseSchedule("linear", T), b["x0"], b["xt"], t, b["eps_hat"], None, variance)
    torch.testing.assert_close(vlb, expected, rtol=1e-9, atol=0)


MEANS = [-50.0, -1.5, -1.0, -0.37, 0.0, 0.03, 0.5, 1.0, 1.2, 50.0]
LOG_SCALES = [math.log(s) for s in (1e-3, 1e-2, 0.3, 1.0, 10.0)]


def level_grid(num_levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every level × mean × log-scale, shaped (L, M, S) after broadcasting."""
    levels = torch.linspace(-1, 1, num_levels, dtype=DTYPE).reshape(-1, 1, 1)
    means = torch.tensor(MEANS, dtype=DTYPE).reshape(1, -1, 1)
    log_scales = torch.tensor(LOG_SCALES, dtype=DTYPE).reshape(1, 1, -1)
    return levels, means, log_scales


@pytest.mark.parametrize("num_levels", [LEVELS, 256])
def test_discretized_probabilities_sum_to_one(num_levels: int) -> None:
    log_prob = discretized_gaussian_log_prob(*level_grid(num_levels), num_levels)
    assert log_prob.shape == (num_levels, len(MEANS), len(LOG_SCALES))
    assert (log_prob <= 0).all()
    total = log_prob.exp().sum(0)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-10)


@pytest.mark.parametrize("num_levels", [LEVELS, 256])
def test_discretized_bins_match_normal_cdf_differences(num_levels: int) -> None:
    levels, means, log_scales = level_grid(num_levels)
    dist = Normal(means, log_scales.exp())
    half_bin = 1 / (num_levels - 1)
    cdf_upper = dist.cdf(levels + half_bin)
    cdf_lower = dist.cdf(levels - half_bin)
    cdf_upper[-1], cdf_lower[0] = 1.0, 0.0
    expected = cdf_upper - cdf_lower
    prob = discretized_gaussian_log_prob(levels, means, log_scales, num_levels).exp()
    torch.testing.assert_close(prob, expected, rtol=0, atol=1e-13)
    resolved = expected > 1e-8
    assert resolved.sum() > 100
    torch.testing.assert_close(prob[resolved], expected[resolved], rtol=1e-6, atol=0)


@pytest.mark.parametrize("num_levels", [LEVELS, 256])
def test_discretized_log_prob_finite_and_tail_exact_for_tiny_scales(num_levels: int) -> None:
    """Tiny σ and means far from the data: finite values and gradients; deep in a tail, where
    the bin's far edge adds nothing (or the bin is open), log P is the log of the Gaussian tail
    beyond its near edge (scipy)."""
    levels = torch.linspace(-1, 1, num_levels, dtype=DTYPE).reshape(-1, 1, 1)
    means = torch.tensor([-30.0, -3.0, -0.4, 0.013, 0.9, 3.0, 30.0], dtype=DTYPE).reshape(1, -1, 1)
    means.requires_grad_(True)
    scales = torch.tensor([1e-2, 3e-3, 1e-3], dtype=DTYPE).reshape(1, 1, -1)
    log_prob = discretized_gaussian_log_prob(levels, means, scales.log(), num_levels)
    assert torch.isfinite(log_prob).all()
    (gradient,) = torch.autograd.grad(log_prob.sum(), means)
    assert torch.isfinite(gradient).all()
    half_bin = 1 / (num_levels - 1)
    x, mu, sigma = (v.detach().numpy() for v in torch.broadcast_tensors(levels, means, scales))
    upper, lower = (x - mu + half_bin) / sigma, (x - mu - half_bin) / sigma
    bottom, top = x < -1 + half_bin, x > 1 - half_bin
    expected_below, expected_above = norm.logcdf(upper), norm.logsf(lower)
    below = (upper < -5) & ~top & (bottom | (norm.logcdf(lower) - expected_below < -30))
    above = (lower > 5) & ~bottom & (top | (norm.logsf(upper) - expected_above < -30))
    actual = log_prob.detach().numpy()
    assert below.sum() > 100 and above.sum() > 100
    torch.testing.assert_close(
        torch.from_numpy(actual[below]), torch.from_numpy(expected_below[below]), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        torch.from_numpy(actual[above]), torch.from_numpy(expected_above[above]), rtol=1e-9, atol=0
    )


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_prior_kl_matches_torch_distributions(name: str) -> None:
    alpha_bar_last = reference_alpha_bars(reference_betas(name))[T]
    x0 = torch.rand((3, 2, 4, 4), generator=torch.Generator().manual_seed(12), dtype=DTYPE) * 2 - 1
    q = Normal(math.sqrt(alpha_bar_last) * x0, math.sqrt(1 - alpha_bar_last))
    standard = Normal(torch.zeros_like(x0), torch.ones_like(x0))
    expected = kl_divergence(q, standard).flatten(1).sum(1)
    assert (expected > 0).all()
    torch.testing.assert_close(prior_kl(NoiseSchedule(name, T), x0), expected, rtol=1e-6, atol=0)


def test_nats_to_bpd() -> None:
    nats = torch.tensor([math.log(2) * 3072 * 3.5], dtype=DTYPE)
    torch.testing.assert_close(nats_to_bpd(nats, 3072), torch.tensor([3.5], dtype=DTYPE))
