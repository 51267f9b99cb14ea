"""Schedules, marginals, posterior and conversions of `diffbench.core.diffusion`, and the heads'
and weightings' per-t weights, each checked against an independent computation (numpy/math
loops, Bayes' rule, autograd)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from diffbench.core.diffusion import (
    NoiseSchedule,
    elbo_eps_weight,
    eps_to_score,
    eps_to_x0,
    linear_betas,
    make_betas,
    posterior_mean,
    posterior_variance,
    q_sample,
    score_to_eps,
    snr,
    v_target,
    v_to_eps,
    x0_to_eps,
)
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS

T = 1000
SCHEDULE_NAMES = ("linear", "cosine")
DTYPE = torch.float64


def reference_betas(name: str) -> list[float]:
    """β_1..β_T for T = 1000 from the papers' definitions, without torch."""
    if name == "linear":
        return np.linspace(1e-4, 0.02, T).tolist()
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    return [min(1 - f[t] / f[t - 1], 0.999) for t in range(1, T + 1)]


def reference_alpha_bars(betas: list[float]) -> list[float]:
    """ᾱ_0..ᾱ_T by a plain running product, ᾱ_0 = 1."""
    alpha_bars = [1.0]
    for beta in betas:
        alpha_bars.append(alpha_bars[-1] * (1 - beta))
    return alpha_bars


def column(values: list[float], ndim: int) -> Tensor:
    """Per-example scalars shaped (B, 1, …, 1) for a batch with `ndim` dimensions."""
    return torch.tensor(values, dtype=DTYPE).reshape(-1, *([1] * (ndim - 1)))


def coefficient_tables(schedule: NoiseSchedule) -> list[Tensor]:
    """β, α, ᾱ and ᾱ_{t−1} tables, in `elbo_weight`'s argument order."""
    return [schedule.betas, schedule.alphas, schedule.alphas_cumprod, schedule.alphas_cumprod_prev]


def test_linear_betas_are_ddpm_linspace() -> None:
    expected = torch.linspace(1e-4, 0.02, T, dtype=DTYPE)
    assert torch.equal(linear_betas(T), expected)
    assert torch.equal(make_betas("linear", T), expected)


def test_linear_betas_rescale_with_num_timesteps() -> None:
    torch.testing.assert_close(
        linear_betas(100), torch.linspace(1e-3, 0.2, 100, dtype=DTYPE), rtol=1e-14, atol=0
    )


def test_unknown_schedule_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_betas("sigmoid", T)


def test_cosine_alpha_bar_is_ratio_of_cosines_where_unclipped() -> None:
    f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    unclipped = [t for t in range(1, T + 1) if 1 - f[t] / f[t - 1] < 0.999]
    first_clipped = len(unclipped) + 1
    assert unclipped == list(range(1, first_clipped)) and first_clipped == T
    table = NoiseSchedule("cosine", T).alphas_cumprod
    expected = torch.tensor([f[t] / f[0] for t in range(first_clipped)], dtype=DTYPE)
    torch.testing.assert_close(table[:first_clipped], expected, rtol=1e-10, atol=0)
    assert table[T].item() == pytest.approx(table[T - 1].item() * (1 - 0.999), rel=1e-12)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_tables(name: str) -> None:
    schedule = NoiseSchedule(name, T)
    tables = {
        "betas": schedule.betas,
        "alphas": schedule.alphas,
        "alphas_cumprod": schedule.alphas_cumprod,
        "alphas_cumprod_prev": schedule.alphas_cumprod_prev,
        "posterior_variance": schedule.posterior_variance,
    }
    for key, table in tables.items():
        assert table.dtype == DTYPE, key
        assert table.shape == (T + 1,), key
    assert schedule.betas[0].item() == 0.0
    assert schedule.alphas_cumprod[0].item() == 1.0
    betas = reference_betas(name)
    # Cosine β = 1 − f(t)/f(t−1) cancels, so tiny early β agree only to ~1e-12 relative.
    torch.testing.assert_close(schedule.betas[1:], torch.tensor(betas, dtype=DTYPE), rtol=1e-9, atol=0)
    alpha_bars = reference_alpha_bars(betas)
    torch.testing.assert_close(
        schedule.alphas_cumprod, torch.tensor(alpha_bars, dtype=DTYPE), rtol=1e-12, atol=0
    )
    prev = [1.0, *alpha_bars[:-1]]
    torch.testing.assert_close(
        schedule.alphas_cumprod_prev, torch.tensor(prev, dtype=DTYPE), rtol=1e-12, atol=0
    )
    tilde = [0.0] + [(1 - prev[t]) / (1 - alpha_bars[t]) * betas[t - 1] for t in range(1, T + 1)]
    torch.testing.assert_close(
        schedule.posterior_variance, torch.tensor(tilde, dtype=DTYPE), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_forward_marginal_composes_one_step_kernels(name: str) -> None:
    """Iterate q(x_t|x_{t−1}) = N(√α_t x_{t−1}, β_t) on scalars; compare with q(x_t|x0)."""
    schedule = NoiseSchedule(name, T)
    checkpoints = {1, 2, 10, 250, 600, T}
    x0_values = [-1.0, 0.3, 0.9]
    x0 = torch.tensor(x0_values, dtype=DTYPE)
    means, variance = list(x0_values), 0.0
    for t, beta in enumerate(reference_betas(name), start=1):
        means = [math.sqrt(1 - beta) * m for m in means]
        variance = (1 - beta) * variance + beta
        if t not in checkpoints:
            continue
        alpha_bar = schedule.alphas_cumprod[t]
        marginal_mean = q_sample(x0, torch.zeros_like(x0), alpha_bar)
        marginal_std = q_sample(x0, torch.ones_like(x0), alpha_bar) - marginal_mean
        torch.testing.assert_close(marginal_mean, torch.tensor(means, dtype=DTYPE), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(marginal_std**2, torch.full_like(x0, variance), rtol=1e-10, atol=0)
        assert 1 - alpha_bar.item() == pytest.approx(variance, rel=1e-10)


@pytest.mark.parametrize("t", [50, 400])
def test_q_sample_monte_carlo_moments(t: int) -> None:
    schedule = NoiseSchedule("linear", T)
    generator = torch.Generator().manual_seed(t)
    n = 400_000
    x0 = torch.full((n,), 0.7, dtype=DTYPE)
    samples = q_sample(x0, torch.randn(n, generator=generator, dtype=DTYPE), schedule.alphas_cumprod[t])
    alpha_bar = reference_alpha_bars(reference_betas("linear"))[t]
    variance = 1 - alpha_bar
    assert abs(samples.mean().item() - math.sqrt(alpha_bar) * 0.7) < 5 * math.sqrt(variance / n)
    assert abs(samples.var().item() - variance) < 5 * variance * math.sqrt(2 / n)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("t", [2, 3, 40, 500, T])
def test_posterior_is_bayes_rule(name: str, t: int) -> None:
    """q(x_{t−1}|x_t,x0) ∝ N(x_{t−1}; √ᾱ_{t−1}x0, 1−ᾱ_{t−1}) · N(x_t; √α_t x_{t−1}, β_t)."""
    schedule = NoiseSchedule(name, T)
    betas = reference_betas(name)
    beta = betas[t - 1]
    alpha = 1 - beta
    alpha_bar_prev = reference_alpha_bars(betas)[t - 1]
    x0 = torch.tensor([0.4, -1.0, 0.9], dtype=DTYPE)
    xt = torch.tensor([-1.3, 0.2, 2.5], dtype=DTYPE)
    prior_precision = 1 / (1 - alpha_bar_prev)
    likelihood_precision = alpha / beta
    expected_variance = 1 / (prior_precision + likelihood_precision)
    expected_mean = expected_variance * (
        prior_precision * math.sqrt(alpha_bar_prev) * x0 + likelihood_precision * xt / math.sqrt(alpha)
    )
    c = schedule.coefficients(torch.tensor([t]), 1)
    torch.testing.assert_close(posterior_mean(x0, xt, **c), expected_mean, rtol=1e-9, atol=1e-12)
    assert schedule.posterior_variance[t].item() == pytest.approx(expected_variance, rel=1e-9)
    direct = posterior_variance(c["beta"], c["alpha_bar"], c["alpha_bar_prev"])
    assert direct.item() == pytest.approx(expected_variance, rel=1e-9)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_posterior_at_t1_is_x0_without_noise(name: str) -> None:
    schedule = NoiseSchedule(name, T)
    x0 = torch.tensor([0.4, -1.0], dtype=DTYPE)
    xt = torch.tensor([0.5, -0.7], dtype=DTYPE)
    c = schedule.coefficients(torch.tensor([1]), 1)
    torch.testing.assert_close(posterior_mean(x0, xt, **c), x0, rtol=1e-12, atol=1e-15)
    assert schedule.posterior_variance[1].item() == 0.0


def random_batch(seed: int, ts: list[int], name: str = "linear") -> dict[str, Tensor]:
    """x0, ε, ε̂ and x_t = √ᾱ x0 + √(1−ᾱ) ε built by hand, ᾱ from the reference loop."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(ts), 2, 3, 3)
    alpha_bars = reference_alpha_bars(reference_betas(name))
    alpha_bar = column([alpha_bars[t] for t in ts], len(shape))
    x0 = torch.rand(shape, generator=generator, dtype=DTYPE) * 2 - 1
    eps = torch.randn(shape, generator=generator, dtype=DTYPE)
    eps_hat = torch.randn(shape, generator=generator, dtype=DTYPE)
    xt = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    return {"x0": x0, "eps": eps, "eps_hat": eps_hat, "xt": xt, "alpha_bar": alpha_bar}


def squared_norm(x: Tensor) -> Tensor:
    return x.flatten(1).pow(2).sum(1)


TS = [1, 2, 10, 100, 500, 999, T]


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_conversions_recover_truth_and_round_trip(name: str) -> None:
    b = random_batch(0, TS, name)
    alpha_bar = b["alpha_bar"]
    torch.testing.assert_close(eps_to_x0(b["xt"], b["eps"], alpha_bar), b["x0"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x0_to_eps(b["xt"], b["x0"], alpha_bar), b["eps"], rtol=1e-9, atol=1e-9)
    x0_hat = eps_to_x0(b["xt"], b["eps_hat"], alpha_bar)
    torch.testing.assert_close(x0_to_eps(b["xt"], x0_hat, alpha_bar), b["eps_hat"], rtol=1e-9, atol=1e-9)
    score_hat = eps_to_score(b["eps_hat"], alpha_bar)
    torch.testing.assert_close(score_to_eps(score_hat, alpha_bar), b["eps_hat"], rtol=1e-12, atol=1e-12)
    v = alpha_bar.sqrt() * b["eps"] - (1 - alpha_bar).sqrt() * b["x0"]
    torch.testing.assert_close(v_target(b["x0"], b["eps"], alpha_bar), v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v_to_eps(b["xt"], v, alpha_bar), b["eps"], rtol=1e-9, atol=1e-9)
    for head in HEADS.values():
        target = head.target(b["x0"], b["eps"], alpha_bar)
        torch.testing.assert_close(head.to_eps(target, b["xt"], alpha_bar), b["eps"], rtol=1e-9, atol=1e-9)


def test_score_of_true_noise_is_gradient_of_forward_kernel() -> None:
    """s = −ε/√(1−ᾱ) is ∇_{x_t} log q(x_t | x0), taken here by autograd."""
    b = random_batch(1, TS[1:])
    xt = b["xt"].clone().requires_grad_(True)
    kernel = torch.distributions.Normal(b["alpha_bar"].sqrt() * b["x0"], (1 - b["alpha_bar"]).sqrt())
    (gradient,) = torch.autograd.grad(kernel.log_prob(xt).sum(), xt)
    torch.testing.assert_close(eps_to_score(b["eps"], b["alpha_bar"]), gradient, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        HEADS["score"].target(b["x0"], b["eps"], b["alpha_bar"]), gradient, rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_error_identities_between_heads(name: str) -> None:
    """‖ε−ε̂‖² = SNR_t ‖x0−x̂0‖² = (1−ᾱ_t) ‖s−ŝ‖² = ᾱ_t ‖v−v̂‖²."""
    b = random_batch(2, TS, name)
    alpha_bar = b["alpha_bar"]
    hand_snr = (alpha_bar / (1 - alpha_bar)).flatten()
    torch.testing.assert_close(snr(alpha_bar).flatten(), hand_snr, rtol=1e-12, atol=0)
    eps_error = squared_norm(b["eps"] - b["eps_hat"])
    x0_error = squared_norm(b["x0"] - eps_to_x0(b["xt"], b["eps_hat"], alpha_bar))
    score_error = squared_norm(eps_to_score(b["eps"], alpha_bar) - eps_to_score(b["eps_hat"], alpha_bar))
    torch.testing.assert_close(hand_snr * x0_error, eps_error, rtol=1e-8, atol=0)
    torch.testing.assert_close((1 - alpha_bar).flatten() * score_error, eps_error, rtol=1e-10, atol=0)
    v_hat = (b["eps_hat"] - (1 - alpha_bar).sqrt() * b["xt"]) / alpha_bar.sqrt()
    v_error = squared_norm(v_target(b["x0"], b["eps"], alpha_bar) - v_hat)
    torch.testing.assert_close(alpha_bar.flatten() * v_error, eps_error, rtol=1e-8, atol=0)


def outputs_for_eps_hat(b: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each head's raw output that implies the batch's ε̂, written out by hand."""
    alpha_bar = b["alpha_bar"]
    return {
        "eps": b["eps_hat"],
        "x0": (b["xt"] - (1 - alpha_bar).sqrt() * b["eps_hat"]) / alpha_bar.sqrt(),
        "score": -b["eps_hat"] / (1 - alpha_bar).sqrt(),
        "v": (b["eps_hat"] - (1 - alpha_bar).sqrt() * b["xt"]) / alpha_bar.sqrt(),
    }


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_head_outputs_imply_eps_hat_and_factors_convert_errors(name: str) -> None:
    """Each head's hand-written output maps to ε̂, and its own squared error times c_head is the
    ε-space error, with c_head = 1, SNR, 1 − ᾱ, ᾱ written out by hand."""
    b = random_batch(3, TS, name)
    alpha_bar = b["alpha_bar"]
    outputs = outputs_for_eps_hat(b)
    eps_error = squared_norm(b["eps"] - b["eps_hat"])
    hand_factors = {
        "eps": torch.ones_like(alpha_bar),
        "x0": alpha_bar / (1 - alpha_bar),
        "score": 1 - alpha_bar,
        "v": alpha_bar,
    }
    assert set(HEADS) == set(hand_factors)
    for key, head in HEADS.items():
        torch.testing.assert_close(
            head.to_eps(outputs[key], b["xt"], alpha_bar), b["eps_hat"], rtol=1e-9, atol=1e-9
        )
        own = squared_norm(head.target(b["x0"], b["eps"], alpha_bar) - outputs[key])
        factor = head.eps_factor(alpha_bar).flatten()
        torch.testing.assert_close(factor, hand_factors[key].flatten(), rtol=1e-12, atol=0)
        torch.testing.assert_close(factor * own, eps_error, rtol=1e-8, atol=0)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_elbo_weights_with_posterior_variance_are_snr_differences(name: str) -> None:
    schedule = NoiseSchedule(name, T)
    betas = reference_betas(name)
    alpha_bars = np.array(reference_alpha_bars(betas))
    snrs = alpha_bars[1:] / (1 - alpha_bars[1:])
    snr_now, snr_prev = snrs[1:], snrs[:-1]
    expected = {
        "eps": 0.5 * (snr_prev / snr_now - 1),
        "x0": 0.5 * (snr_prev - snr_now),
        "score": 0.5 * (snr_prev / snr_now - 1) * (1 - alpha_bars[2:]),
    }
    t = torch.arange(2, T + 1)
    for key in expected:
        weight = WEIGHTINGS["elbo"].head_weight(HEADS[key], schedule, t, "small")
        torch.testing.assert_close(weight, torch.tensor(expected[key], dtype=DTYPE), rtol=1e-8, atol=0)


def test_eps_elbo_weight_documented_values_for_linear_schedule() -> None:
    """DESIGN.md: ≈0.60 at t = 2 and ≈0.010 for t ≥ 100. The weight is 0.0103 at t = 100 and
    0.0102 at t = T but dips to 0.0050 near t = 350, so "≈0.010" holds within a factor two."""
    schedule = NoiseSchedule("linear", T)
    beta, alpha, alpha_bar, _ = coefficient_tables(schedule)
    weight = elbo_eps_weight(beta, alpha, alpha_bar, schedule.posterior_variance)
    assert weight[2].item() == pytest.approx(0.60, abs=0.005)
    assert weight[100].item() == pytest.approx(0.010, abs=0.0005)
    assert weight[T].item() == pytest.approx(0.010, abs=0.0005)
    assert 0.0045 < weight[100:].min().item() and weight[100:].max().item() < 0.0105
    assert weight[2].item() / weight[100:].max().item() > 50


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_eps_space_weight_of_every_weighting(name: str) -> None:
    """w_ε(t) of every weighting against its closed form on the reference schedule: elbo
    ½(SNR_{t−1}/SNR_t − 1) with σ² = β̃; eps 1; x0 1/SNR; score 1/(1 − ᾱ); v 1/ᾱ; Min-SNR-5
    min(SNR, 5)/SNR; EDM λ(σ)σ² with σ² = 1/SNR; own 1/c_head (for each head)."""
    schedule = NoiseSchedule(name, T)
    alpha_bars = np.array(reference_alpha_bars(reference_betas(name)))
    snrs = alpha_bars[1:] / (1 - alpha_bars[1:])  # SNR_1 .. SNR_T
    now, alpha_bar = snrs[1:], alpha_bars[2:]
    sigma2, sigma_data = 1 / now, 0.5
    expected = {
        "elbo": 0.5 * (snrs[:-1] / now - 1),
        "elbo_is": 0.5 * (snrs[:-1] / now - 1),
        "eps": np.ones(T - 1),
        "x0": 1 / now,
        "score": 1 / (1 - alpha_bar),
        "v": 1 / alpha_bar,
        "minsnr": np.minimum(now, 5.0) / now,
        "edm": (sigma2 + sigma_data**2) / (sigma2 * sigma_data**2) * sigma2,
    }
    own = {"eps": np.ones(T - 1), "x0": 1 / now, "score": 1 / (1 - alpha_bar), "v": 1 / alpha_bar}
    assert set(WEIGHTINGS) == {*expected, "own"}
    t = torch.arange(2, T + 1)
    for key, head in HEADS.items():
        for weighting, weight in {**expected, "own": own[key]}.items():
            actual = WEIGHTINGS[weighting].eps_weight(head, schedule, t, "small")
            torch.testing.assert_close(
                actual, torch.tensor(weight), rtol=1e-8, atol=0, msg=f"{key} {weighting}"
            )
