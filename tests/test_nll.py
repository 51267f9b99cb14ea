"""NLL estimators of `diffbench.nll`: the discrete VLB term by term against torch.distributions,
both estimators against the exact log-density of small Gaussian mixtures (ε = exact ε*), and the
λ-time ODE against a Gaussian's closed-form flow and the former integration in the table's t."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch
import torchdiffeq
from torch import Tensor
from torch.distributions import Normal, kl_divergence

from diffbench.core.diffusion import NoiseSchedule, eps_to_score, importance_timesteps
from diffbench.data.gmm import DiffusedMixture
from diffbench.sampling.nll import (
    mean_and_stderr,
    ode_nll_bpd,
    stratified_timesteps,
    stratified_weights,
    vlb_bpd,
)
from diffbench.sampling.samplers import T_MIN, EpsFn, continuous_eps

TINY_T = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_eps(x: Tensor, t: Tensor) -> Tensor:
    """A fixed, imperfect denoiser: linear in x_t with a t-dependent offset."""
    return (0.3 * x + 0.05 * t.double().reshape(-1, 1, 1, 1)).float()


def grid_images(num_levels: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Images on the L-level grid of [−1, 1], with both edge values present."""
    levels = torch.randint(0, num_levels, shape, generator=generator)
    levels.view(-1)[:2] = torch.tensor([0, num_levels - 1])
    return (2 * levels / (num_levels - 1) - 1).float()


def reference_vlb_nats(
    schedule: NoiseSchedule, x0: Tensor, num_levels: int | None, variance: str, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Per-example L_{t−1} (B, T) and L_T (B,) from the DESIGN.md formulas with torch.distributions,
    drawing x_t noise for t = 1..T in order, as `vlb_bpd` documents."""
    betas = schedule.betas
    alpha_bars = torch.cumprod(1 - betas, 0)
    x0 = x0.double()

    def tilde_beta(t: int) -> Tensor:
        return (1 - alpha_bars[t - 1]) / (1 - alpha_bars[t]) * betas[t]

    terms = []
    for t in range(1, schedule.num_timesteps + 1):
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        alpha_bar, alpha_bar_prev, beta = alpha_bars[t], alpha_bars[t - 1], betas[t]
        xt = (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise).float()
        eps_hat = linear_eps(xt, torch.full((len(x0),), t)).double()
        xt = xt.double()
        model_mean = (xt - beta / (1 - alpha_bar).sqrt() * eps_hat) / (1 - beta).sqrt()
        # improved DDPM: σ_1² is β̃_2 for both choices (β̃_1 = 0).
        sigma2 = tilde_beta(2) if t == 1 else tilde_beta(t) if variance == "small" else beta
        model = Normal(model_mean, sigma2.sqrt())
        if t == 1 and num_levels is None:
            nats = -model.log_prob(x0)
        elif t == 1:
            half_bin = 1 / (num_levels - 1)
            upper = torch.where(x0 > 1 - half_bin, 1.0, model.cdf(x0 + half_bin))
            lower = torch.where(x0 < -1 + half_bin, 0.0, model.cdf(x0 - half_bin))
            nats = -(upper - lower).log()
        else:
            true_mean = (alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)) * x0 + (
                (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)
            ) * xt
            nats = kl_divergence(Normal(true_mean, tilde_beta(t).sqrt()), model)
        terms.append(nats.flatten(1).sum(1))
    alpha_bar_end = alpha_bars[-1]
    prior = kl_divergence(Normal(alpha_bar_end.sqrt() * x0, (1 - alpha_bar_end).sqrt()), Normal(0.0, 1.0))
    return torch.stack(terms, 1), prior.flatten(1).sum(1)


@pytest.mark.parametrize("num_levels", [17, None])
@pytest.mark.parametrize("variance", ["small", "large"])
def test_vlb_matches_a_term_by_term_torch_distributions_computation(
    num_levels: int | None, variance: str
) -> None:
    schedule = NoiseSchedule("linear", TINY_T)
    x0 = grid_images(17, (5, 1, 4, 4), seeded(0))
    bits = 16 * math.log(2)
    terms, prior = reference_vlb_nats(schedule, x0, num_levels, variance, seeded(1))
    # A batch of timesteps that does not divide T: results must not depend on the batching.
    result = vlb_bpd(linear_eps, schedule, x0, num_levels, seeded(1), variance=variance, batch_timesteps=3)
    torch.testing.assert_close(result.terms_bpd, terms / bits, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(result.prior_bpd, prior / bits, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(result.total_bpd, (prior + terms.sum(1)) / bits, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(result.mean_terms_bpd, (terms / bits).mean(0), rtol=1e-6, atol=1e-9)
    assert result.timesteps.tolist() == list(range(1, TINY_T + 1))


def test_vlb_over_a_subset_of_timesteps_weights_it_by_T_over_its_size() -> None:
    schedule = NoiseSchedule("linear", TINY_T)
    x0 = grid_images(17, (4, 1, 4, 4), seeded(0))
    full = vlb_bpd(linear_eps, schedule, x0, 17, seeded(2))
    every_step = vlb_bpd(linear_eps, schedule, x0, 17, seeded(2), timesteps=torch.arange(1, TINY_T + 1))
    torch.testing.assert_close(every_step.total_bpd, full.total_bpd, rtol=0, atol=0)
    subset = vlb_bpd(linear_eps, schedule, x0, 17, seeded(2), timesteps=torch.tensor([2, 5, 9]))
    torch.testing.assert_close(subset.prior_bpd, full.prior_bpd)
    torch.testing.assert_close(subset.total_bpd, subset.prior_bpd + TINY_T / 3 * subset.terms_bpd.sum(1))
    with pytest.raises(ValueError):
        vlb_bpd(linear_eps, schedule, x0, 17, seeded(2), timesteps=torch.tensor([0, 3]))


def test_per_example_timesteps_score_each_example_at_its_own_steps() -> None:
    schedule = NoiseSchedule("linear", TINY_T)
    x0 = grid_images(17, (3, 1, 4, 4), seeded(0))
    full = vlb_bpd(linear_eps, schedule, x0, 17, seeded(2))
    same = vlb_bpd(
        linear_eps, schedule, x0, 17, seeded(2), timesteps=torch.arange(1, TINY_T + 1).expand(3, -1)
    )
    torch.testing.assert_close(same.total_bpd, full.total_bpd, rtol=0, atol=0)
    own = torch.tensor([[1, 4], [2, 9], [10, 3]])
    mixed = vlb_bpd(linear_eps, schedule, x0, 17, seeded(2), timesteps=own)
    torch.testing.assert_close(mixed.total_bpd, mixed.prior_bpd + TINY_T / 2 * mixed.terms_bpd.sum(1))
    assert torch.equal(mixed.timesteps, own)
    shared = vlb_bpd(linear_eps, schedule, x0, 17, seeded(2), timesteps=own[0])
    torch.testing.assert_close(shared.terms_bpd[0], mixed.terms_bpd[0])
    assert not torch.allclose(shared.terms_bpd[1:], mixed.terms_bpd[1:])
    rows = stratified_timesteps(TINY_T, 5, seeded(0), batch=3)
    assert rows.shape == (3, 6) and torch.equal(rows[:, :2], torch.tensor([[1, 2]] * 3))
    assert torch.equal((rows[:, 1:] - 1) // 2, torch.arange(5).expand(3, -1))
    with pytest.raises(ValueError):
        vlb_bpd(linear_eps, schedule, x0, 17, seeded(2), timesteps=own[:2])


def test_stratified_timesteps_draw_one_step_from_each_stratum() -> None:
    steps = stratified_timesteps(1000, 50, seeded(0))
    assert len(steps) == 51 and steps[0] == 1 and 2 <= steps[1] <= 20 and steps.max() <= 1000
    assert torch.equal((steps[1:] - 1) // 20, torch.arange(50))
    assert not torch.equal(steps, stratified_timesteps(1000, 50, seeded(1)))
    with pytest.raises(ValueError):
        stratified_timesteps(1000, 30, seeded(0))
    with pytest.raises(ValueError):
        stratified_timesteps(1000, 1000, seeded(0))


def test_stratified_estimate_is_unbiased_for_any_terms() -> None:
    """E[Σ_i w_i f(t_i)] = Σ_t f(t): exact by enumeration of every stratum's draw (T = 12)."""
    T, count = 12, 3
    terms = torch.rand(T + 1, generator=seeded(3), dtype=torch.float64)
    weights = stratified_weights(T, count)
    assert weights.sum() == T
    width = T // count
    expected = sum(
        float(weights @ terms[torch.tensor([1, first, *(1 + width * k + o for k, o in enumerate(rest, 1))])])
        for first in range(2, width + 1)
        for rest in itertools.product(range(width), repeat=count - 1)
    ) / ((width - 1) * width ** (count - 1))
    assert expected == pytest.approx(float(terms[1:].sum()), rel=1e-12)
    draws = stratified_timesteps(T, count, seeded(4), batch=20_000)
    assert set(draws[:, 1].tolist()) == set(range(2, width + 1))
    estimate = (terms[draws] @ weights).mean()
    assert float(estimate) == pytest.approx(float(terms[1:].sum()), rel=0.01)


def test_importance_timesteps_follow_the_proposal_evenly() -> None:
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625], dtype=torch.float64)
    t, p = importance_timesteps(probs, 64, seeded(0))
    assert t.min() >= 2 and t.max() <= 6 and torch.equal(p, probs[t - 2])
    counts = torch.bincount(t - 2, minlength=5).double()
    assert (counts - 64 * probs).abs().max() < 1, "every t gets its share to within one draw"
    draws = torch.cat([importance_timesteps(probs, 3, seeded(s))[0] for s in range(4000)])
    frequencies = torch.bincount(draws - 2, minlength=5).double() / len(draws)
    torch.testing.assert_close(frequencies, probs, atol=0.015, rtol=0)


def test_mean_and_stderr_is_the_sample_mean_and_its_standard_error() -> None:
    values = [1.0, 2.0, 4.0, 7.5]
    mean, stderr = mean_and_stderr(torch.tensor(values))
    assert mean == pytest.approx(statistics.mean(values))
    assert stderr == pytest.approx(statistics.stdev(values) / 2)
    with pytest.raises(ValueError):
        mean_and_stderr(torch.tensor([1.0]))


def four_dim_mixture() -> DiffusedMixture:
    """Three well separated components in D = 4 (images 1×2×2), correlated covariances."""
    means = torch.tensor([[-1.2, -0.8, 0.5, 1.0], [1.0, 0.9, -0.6, -0.4], [0.2, -1.0, 1.2, -1.1]])
    factors = 0.2 * torch.randn(3, 4, 4, generator=seeded(0), dtype=torch.float64)
    covariances = factors @ factors.transpose(1, 2) + 0.05 * torch.eye(4, dtype=torch.float64)
    return DiffusedMixture(torch.tensor([0.5, 0.3, 0.2]), means, covariances)


def one_dim_mixture() -> DiffusedMixture:
    """Two components on a line: Hutchinson's estimate is exact in one dimension."""
    return DiffusedMixture(
        torch.tensor([0.6, 0.4]), torch.tensor([[-0.7], [0.8]]), torch.tensor([[[0.04]], [[0.09]]])
    )


def exact_eps(mixture: DiffusedMixture, schedule: NoiseSchedule) -> EpsFn:
    """The optimal denoiser ε*(x_t, ᾱ(t)) of the mixture, in the samplers' calling convention."""

    def eps_star(x: Tensor, t: Tensor) -> Tensor:
        return mixture.eps_star(x, schedule.alpha_bar_continuous(t))

    return eps_star


def exact_bpd(mixture: DiffusedMixture, x0: Tensor) -> Tensor:
    return -mixture.log_prob(x0, 1.0) / (x0[0].numel() * math.log(2))


@pytest.mark.parametrize(("variance", "max_gap"), [("small", 1.0), ("large", 0.2)])
def test_full_vlb_of_the_exact_denoiser_bounds_the_true_nll_from_above(variance: str, max_gap: float) -> None:
    """Cross-entropy ≥ entropy: averaged over data from q, the bound of the optimal model is ≥
    −log q(x0). The gap is the fixed reverse variances' (≈0.7 bits/dim with β̃, ≈0.08 with β)."""
    mixture, schedule = four_dim_mixture(), NoiseSchedule("linear", 1000)
    x0 = mixture.sample(1000, seeded(1)).float().reshape(-1, 1, 2, 2)
    result = vlb_bpd(
        exact_eps(mixture, schedule), schedule, x0, None, seeded(2), variance, batch_timesteps=50
    )
    gap, stderr = mean_and_stderr(result.total_bpd - exact_bpd(mixture, x0))
    assert -3 * stderr < gap < max_gap
    if variance == "small":
        assert gap > 3 * stderr


def test_probability_flow_nll_of_the_exact_denoiser_is_the_true_nll() -> None:
    """Unbiased up to solver error: the Hutchinson noise averages out over examples. (T_MIN moves
    the exact value by ~1e-5 bits/dim here, far below the tolerance.)"""
    mixture, schedule = four_dim_mixture(), NoiseSchedule("linear", 1000)
    x0 = mixture.sample(200, seeded(1)).float().reshape(-1, 1, 2, 2)
    result = ode_nll_bpd(exact_eps(mixture, schedule), schedule, x0, None, seeded(3), rtol=1e-4, atol=1e-4)
    error, stderr = mean_and_stderr(result.bpd - exact_bpd(mixture, x0))
    assert abs(error) < 4 * stderr and stderr < 0.06
    assert result.nfe > 10


def test_probability_flow_nll_is_exact_per_example_in_one_dimension() -> None:
    """With D = 1 a Rademacher probe gives the divergence exactly, so only solver error and the
    N(0, 1) prior's mismatch with q_T (≈0.01 bits in the tails) remain, per example."""
    mixture, schedule = one_dim_mixture(), NoiseSchedule("linear", 1000)
    x0 = mixture.sample(64, seeded(5)).float().reshape(-1, 1, 1, 1)
    result = ode_nll_bpd(exact_eps(mixture, schedule), schedule, x0, None, seeded(3), rtol=1e-4, atol=1e-4)
    exact = -mixture.log_prob(x0, schedule.alpha_bar_continuous(torch.tensor(T_MIN))) / math.log(2)
    assert (result.bpd - exact).abs().max() < 0.03


def test_dequantized_ode_nll_is_the_nll_of_the_discrete_bins() -> None:
    """On 8-bit data a smooth density gives each bin the mass q(x0)·Δ^D, Δ = 2/255: the ODE's
    bits/dim must land there, which pins the sign and size of the −D log Δ correction."""
    mixture, schedule = four_dim_mixture(), NoiseSchedule("linear", 1000)
    bin_width = 2 / 255
    x0 = ((mixture.sample(400, seeded(1)) + 1) / bin_width).round() * bin_width - 1
    x0 = x0[(x0.abs() < 1).all(1)][:200].float().reshape(-1, 1, 2, 2)
    eps_star = exact_eps(mixture, schedule)
    result = ode_nll_bpd(eps_star, schedule, x0, 256, seeded(6), rtol=1e-4, atol=1e-4, num_probes=4)
    bin_bpd = exact_bpd(mixture, x0) - math.log2(bin_width)
    error, stderr = mean_and_stderr(result.bpd - bin_bpd)
    assert abs(error) < 4 * stderr and stderr < 0.07


@pytest.mark.parametrize("num_levels", [5, 17])
def test_dequantization_fills_each_bin_uniformly(num_levels: int) -> None:
    """In 1-D the ODE density is exact, so the examples sharing a grid value estimate
    E_u[−log q(x0 + u)] − log Δ, u ~ U(−Δ/2, Δ/2), which quadrature gives. Wide bins (L = 5) show
    a wrong width or offset of u; pooled over the 17 levels of the digits, the estimate resolves
    the constant log2((L − 1)/2) itself."""
    mixture, schedule = one_dim_mixture(), NoiseSchedule("linear", 1000)
    copies = 40
    bin_width = 2 / (num_levels - 1)
    grid = torch.linspace(-1, 1, num_levels, dtype=torch.float64)
    x0 = grid.float().repeat_interleave(copies).reshape(-1, 1, 1, 1)
    eps_star = exact_eps(mixture, schedule)
    result = ode_nll_bpd(eps_star, schedule, x0, num_levels, seeded(7), rtol=1e-4, atol=1e-4)
    offsets = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000 * bin_width - bin_width / 2
    points = (grid[:, None] + offsets).reshape(-1, 1, 1, 1)
    log_density = mixture.log_prob(points, schedule.alpha_bar_continuous(torch.tensor(T_MIN)))
    expected = (-log_density.reshape(num_levels, -1).mean(1) - math.log(bin_width)) / math.log(2)
    estimates = result.bpd.reshape(num_levels, copies)
    errors = estimates.mean(1) - expected
    stderrs = estimates.std(1) / math.sqrt(copies)
    assert (errors.abs() < 4 * stderrs + 0.02).all(), errors
    assert errors.mean().abs() < 4 * stderrs.square().sum().sqrt() / num_levels + 0.01, errors.mean()


def test_ode_nll_refuses_a_denoiser_without_gradients() -> None:
    mixture, schedule = four_dim_mixture(), NoiseSchedule("linear", 1000)
    x0 = mixture.sample(4, seeded(1)).float().reshape(-1, 1, 2, 2)
    with pytest.raises(RuntimeError, match="differentiable"):
        ode_nll_bpd(torch.no_grad()(exact_eps(mixture, schedule)), schedule, x0, None, seeded(3))


def diagonal_gaussian() -> DiffusedMixture:
    """One Gaussian in D = 4 with a diagonal covariance: the flow's Jacobian is diagonal, so any
    ±1 probe gives its divergence exactly and the ODE likelihood has no Hutchinson noise."""
    variances = torch.tensor([0.04, 0.09, 0.25, 0.01], dtype=torch.float64)
    return DiffusedMixture(torch.ones(1), torch.tensor([[0.3, -0.5, 0.8, -0.2]]), variances.diag()[None])


def gaussian_flow_bpd(gaussian: DiffusedMixture, schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """−log p(x0) of the exact probability flow from N(0, I) at T to T_MIN, prior mismatch included:
    per coordinate the flow keeps z = (x − √ᾱ μ)/√v, v = ᾱs² + 1 − ᾱ, so x_T and the log-det
    Σ ½ log(v_T/v_0) are closed-form."""
    x = x0.double().reshape(len(x0), -1)
    start = schedule.alpha_bar_continuous(torch.tensor(T_MIN, dtype=torch.float64))
    end = schedule.alphas_cumprod[-1]
    mean, variances = gaussian.means[0], gaussian.covariances[0].diagonal()
    v_start, v_end = start * variances + 1 - start, end * variances + 1 - end
    x_end = end.sqrt() * mean + (v_end / v_start).sqrt() * (x - start.sqrt() * mean)
    prior_nll = 0.5 * (x_end**2).sum(1) + 0.5 * x.shape[1] * math.log(2 * math.pi)
    return (prior_nll - 0.5 * (v_end / v_start).log().sum()) / (x.shape[1] * math.log(2))


def t_time_ode_bpd(eps_fn: EpsFn, schedule: NoiseSchedule, x0: Tensor, tol: float) -> tuple[Tensor, int]:
    """The ODE likelihood as integrated before λ time, in the table's t with dx/dt = −½β(t)[x +
    ∇log p_t], and its evaluation count; a probe of ones is exact for a diagonal Jacobian."""
    nfe = 0

    def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            score = eps_to_score(continuous_eps(eps_fn, x, t), schedule.alpha_bar_continuous(t))
            drift = -0.5 * schedule.beta_continuous(t) * (x + score)
            (divergence,) = torch.autograd.grad(drift, x, torch.ones_like(x))
        return drift.detach(), divergence.flatten(1).sum(1)

    times = torch.tensor([T_MIN, schedule.num_timesteps], dtype=torch.float64)
    initial = (x0.double(), torch.zeros(len(x0), dtype=torch.float64))
    path, divergence = torchdiffeq.odeint(
        dynamics, initial, times, rtol=tol, atol=tol, method="dopri5", options={"step_t": times[1:]}
    )
    num_dims = x0[0].numel()
    prior_nll = 0.5 * (path[-1] ** 2).flatten(1).sum(1) + 0.5 * num_dims * math.log(2 * math.pi)
    return (prior_nll - divergence[-1]) / (num_dims * math.log(2)), nfe


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_log_snr_time_ode_nll_of_a_gaussian_converges_to_the_closed_form(schedule_name: str) -> None:
    """In λ the drift is smooth, so the error falls with the tolerance (linear: 1.5e-4 bits/dim at
    1e-5, 5e-7 at 1e-7), where the table's t stalls at 5e-3 even at 1e-7 (9,722 evaluations)."""
    gaussian, schedule = diagonal_gaussian(), NoiseSchedule(schedule_name, 1000)
    x0 = gaussian.sample(16, seeded(1)).float().reshape(-1, 1, 2, 2)
    exact = gaussian_flow_bpd(gaussian, schedule, x0)
    for tol, max_error in [(1e-5, 1e-3), (1e-7, 1e-5)]:
        result = ode_nll_bpd(exact_eps(gaussian, schedule), schedule, x0, None, seeded(3), rtol=tol, atol=tol)
        assert (result.bpd - exact).abs().max() < max_error, (tol, result.nfe)


def test_log_snr_time_agrees_with_the_tables_t_at_a_fraction_of_the_evaluations() -> None:
    """Same flow, other time variable: at rtol = atol = 1e-5 λ takes 80 evaluations (error 1.5e-4
    bits/dim) where t takes 452 (error 9.5e-3, from the jumps of β(t) at every integer t)."""
    gaussian, schedule = diagonal_gaussian(), NoiseSchedule("linear", 1000)
    x0 = gaussian.sample(16, seeded(1)).float().reshape(-1, 1, 2, 2)
    eps_star = exact_eps(gaussian, schedule)
    result = ode_nll_bpd(eps_star, schedule, x0, None, seeded(3), rtol=1e-5, atol=1e-5)
    reference, reference_nfe = t_time_ode_bpd(eps_star, schedule, x0, 1e-5)
    assert (result.bpd - reference).abs().max() < 0.02
    assert result.nfe < 200 and reference_nfe > 3 * result.nfe, (result.nfe, reference_nfe)
