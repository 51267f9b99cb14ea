"""Samplers of `diffbench.samplers`: shapes and dtypes on a tiny denoiser, the identities that tie
them together (respacing over every step, DDIM with η = 1 = ancestral with β̃), and, with the
exact ε* of a small Gaussian mixture, that each one draws from the mixture (mean, covariance);
the ODE's λ = log SNR time against the schedule's t and a Gaussian's exact transport."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from diffbench.core.diffusion import NoiseSchedule, eps_to_x0, snr
from diffbench.data.gmm import DiffusedMixture
from diffbench.sampling.samplers import (
    SAMPLERS,
    T_MIN,
    ddim,
    ddpm_ancestral,
    probability_flow_drift,
    reverse_chain,
    sample,
    spaced_timesteps,
    x0_trajectory,
)

TINY_T = 20
SHAPE = (6, 1, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_eps(x: Tensor, t: Tensor) -> Tensor:
    """A cheap stand-in for a network: linear in x_t, depending on t, large enough that clipping acts."""
    return (0.8 * x + 0.1 * t.double().reshape(-1, 1, 1, 1) / TINY_T).float()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tiny_schedule() -> NoiseSchedule:
    return NoiseSchedule("linear", TINY_T)


# Settings per sampler and the number of eps_fn calls each must cost (None: adaptive).
SAMPLER_CASES = [
    ("ancestral", {}, TINY_T),
    ("ancestral", {"variance": "small", "steps": 7}, 7),
    ("ddim", {"steps": 5}, 5),
    ("ddim", {"steps": 5, "eta": 1.0}, 5),
    ("sde", {"steps": 30}, 31),
    ("ode", {"method": "heun", "steps": 10}, 21),
    ("ode", {}, None),
]


@pytest.mark.parametrize(("name", "settings", "nfe"), SAMPLER_CASES)
def test_every_sampler_returns_finite_float32_of_the_shape(
    tiny_schedule: NoiseSchedule, name: str, settings: dict, nfe: int | None
) -> None:
    result = sample(name, tiny_eps, tiny_schedule, SHAPE, seeded(), **settings)
    assert result.samples.shape == SHAPE and result.samples.dtype == torch.float32
    assert torch.isfinite(result.samples).all()
    assert (result.nfe == nfe) if nfe is not None else (result.nfe > 1)


def test_sample_rejects_an_unknown_name_listing_the_known_ones(tiny_schedule: NoiseSchedule) -> None:
    with pytest.raises(ValueError, match="ancestral, ddim, ode, sde"):
        sample("euler", tiny_eps, tiny_schedule, SHAPE, seeded())
    assert set(SAMPLERS) == {"ancestral", "ddim", "sde", "ode"}


def test_spaced_timesteps_keep_both_ends_once_each() -> None:
    for steps in (1, 2, 7, 50, 999, 1000):
        timesteps = spaced_timesteps(1000, steps)
        assert len(timesteps) == steps and timesteps[0] == 1000
        assert (timesteps.diff() < 0).all()
        assert steps == 1 or timesteps[-1] == 1
    with pytest.raises(ValueError):
        spaced_timesteps(10, 11)


def test_respaced_chain_keeps_the_marginals_of_the_kept_steps(tiny_schedule: NoiseSchedule) -> None:
    full = reverse_chain(tiny_schedule)
    respaced_all = reverse_chain(tiny_schedule, TINY_T)
    for table in ("timesteps", "beta", "alpha", "alpha_bar", "alpha_bar_prev"):
        torch.testing.assert_close(getattr(respaced_all, table), getattr(full, table), rtol=1e-12, atol=0)
    # β̃ differs only at t = 1 (0 by definition), whose variance no sampler uses.
    torch.testing.assert_close(respaced_all.posterior_variance[:-1], full.posterior_variance[:-1])
    respaced = reverse_chain(tiny_schedule, 6)
    torch.testing.assert_close(respaced.alpha_bar, tiny_schedule.alphas_cumprod[respaced.timesteps])
    # Walking the respaced chain's α' from the end multiplies back to each kept ᾱ.
    torch.testing.assert_close(respaced.alpha.flip(0).cumprod(0).flip(0), respaced.alpha_bar)


@pytest.mark.parametrize("variance", ["large", "small"])
def test_respaced_ancestral_over_every_step_equals_the_plain_chain(
    tiny_schedule: NoiseSchedule, variance: str
) -> None:
    plain = ddpm_ancestral(tiny_eps, tiny_schedule, SHAPE, seeded(), variance=variance)
    respaced = ddpm_ancestral(tiny_eps, tiny_schedule, SHAPE, seeded(), variance=variance, steps=TINY_T)
    torch.testing.assert_close(respaced, plain, rtol=1e-6, atol=1e-6)
    fewer = ddpm_ancestral(tiny_eps, tiny_schedule, SHAPE, seeded(), variance=variance, steps=TINY_T // 2)
    assert not torch.allclose(fewer, plain, atol=1e-3)


def test_ddim_with_eta_zero_is_a_function_of_its_starting_noise(tiny_schedule: NoiseSchedule) -> None:
    generator = seeded(3)
    first = ddim(tiny_eps, tiny_schedule, SHAPE, generator, steps=8)
    # Only x_T was drawn: the generator is exactly where one draw of the shape leaves it.
    reference = seeded(3)
    torch.randn(SHAPE, generator=reference, dtype=torch.float64)
    assert torch.equal(generator.get_state(), reference.get_state())
    torch.testing.assert_close(
        ddim(tiny_eps, tiny_schedule, SHAPE, seeded(3), steps=8), first, rtol=0, atol=0
    )
    assert not torch.allclose(ddim(tiny_eps, tiny_schedule, SHAPE, seeded(4), steps=8), first)


@pytest.mark.parametrize("steps", [TINY_T, 6])
def test_ddim_with_eta_one_is_the_ancestral_sampler_with_posterior_variance(
    tiny_schedule: NoiseSchedule, steps: int
) -> None:
    stochastic = ddim(tiny_eps, tiny_schedule, SHAPE, seeded(5), steps=steps, eta=1.0)
    ancestral = ddpm_ancestral(tiny_eps, tiny_schedule, SHAPE, seeded(5), variance="small", steps=steps)
    torch.testing.assert_close(stochastic, ancestral, rtol=1e-5, atol=1e-5)


def test_x0_trajectory_records_the_ancestral_chain(tiny_schedule: NoiseSchedule) -> None:
    trajectory = x0_trajectory(tiny_eps, tiny_schedule, SHAPE, seeded(6), num_snapshots=4)
    samples = ddpm_ancestral(tiny_eps, tiny_schedule, SHAPE, seeded(6))
    torch.testing.assert_close(trajectory.samples, samples, rtol=0, atol=0)
    assert trajectory.timesteps.tolist() == [20, 14, 7, 1]
    assert trajectory.x0_hats.shape == (4, *SHAPE) and trajectory.x0_hats.dtype == torch.float32
    # At t = 1 the posterior mean is x̂0 itself, so the last belief is the sample.
    torch.testing.assert_close(trajectory.x0_hats[-1], samples, rtol=1e-5, atol=1e-5)
    assert trajectory.x0_hats.abs().max() <= 1
    with pytest.raises(ValueError):
        x0_trajectory(tiny_eps, tiny_schedule, SHAPE, seeded(), num_snapshots=TINY_T + 1)


def small_mixture() -> DiffusedMixture:
    """Three well separated components in D = 4 with unequal weights and correlated covariances."""
    means = torch.tensor([[-1.2, -0.8, 0.5, 1.0], [1.0, 0.9, -0.6, -0.4], [0.2, -1.0, 1.2, -1.1]])
    factors = 0.2 * torch.randn(3, 4, 4, generator=seeded(0), dtype=torch.float64)
    covariances = factors @ factors.transpose(1, 2) + 0.05 * torch.eye(4, dtype=torch.float64)
    return DiffusedMixture(torch.tensor([0.5, 0.3, 0.2]), means, covariances)


def assert_mean_and_covariance(x: Tensor, target: DiffusedMixture) -> None:
    """Every entry of the sample mean and covariance of x (n, D) within 4 standard errors of q_0's."""
    num_samples = len(x)
    mean, covariance = target.mean(), target.covariance()
    mean_z = (x.mean(0) - mean) / (covariance.diagonal() / num_samples).sqrt()
    centred = x - x.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    covariance_z = (products.mean(0) - covariance) / (products.std(0) / math.sqrt(num_samples))
    assert mean_z.abs().max() < 4, mean_z
    assert covariance_z.abs().max() < 4, covariance_z


# Enough steps that discretization error stays below the statistical tolerance of 4,000 samples.
EXACT_CASES = [
    ("ancestral", {"clip_x0": False}),
    ("ancestral", {"clip_x0": False, "variance": "small", "steps": 250}),
    ("ddim", {"clip_x0": False, "steps": 200}),
    ("sde", {}),
    ("ode", {"rtol": 1e-4, "atol": 1e-4}),
    ("ode", {"method": "heun", "steps": 100}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "settings"), EXACT_CASES)
def test_samplers_with_the_exact_denoiser_draw_from_the_mixture(name: str, settings: dict) -> None:
    mixture, schedule = small_mixture(), NoiseSchedule("linear", 1000)

    def eps_star(x: Tensor, t: Tensor) -> Tensor:
        return mixture.eps_star(x, schedule.alpha_bar_continuous(t))

    num_samples = 4000
    samples = sample(name, eps_star, schedule, (num_samples, 1, 2, 2), seeded(4), **settings).samples
    assert_mean_and_covariance(samples.double().reshape(num_samples, 4), mixture)


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("num_timesteps", [TINY_T, 1000])
def test_t_of_log_snr_inverts_log_snr_continuous(schedule_name: str, num_timesteps: int) -> None:
    schedule = NoiseSchedule(schedule_name, num_timesteps)
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
    fractions = torch.tensor([1e-9, 0.25, 0.5, 0.999], dtype=torch.float64)
    t = torch.cat([steps, (steps[:-1, None] + fractions).flatten()])
    log_snr = schedule.log_snr_continuous(t)
    torch.testing.assert_close(schedule.t_of_log_snr(log_snr), t, rtol=0, atol=1e-9)
    torch.testing.assert_close(log_snr[1 : num_timesteps + 1], snr(schedule.alphas_cumprod[1:]).log())
    assert log_snr[0] == math.inf and (log_snr[: num_timesteps + 1].diff() < 0).all()
    # And the other way round, on a λ grid that knows nothing of the table's steps.
    grid = torch.linspace(float(log_snr[num_timesteps]), float(log_snr[1]), 257, dtype=torch.float64)
    torch.testing.assert_close(schedule.log_snr_continuous(schedule.t_of_log_snr(grid)), grid)


def test_log_snr_drift_is_the_t_drift_over_dlambda_dt() -> None:
    """dx/dλ = (dx/dt)/(dλ/dt) with dλ/dt = −β(t)/(1 − ᾱ(t)), the latter checked by central
    differences of `log_snr_continuous` inside segments, where β(t) is constant."""
    schedule = NoiseSchedule("cosine", TINY_T)
    x = torch.randn(SHAPE, generator=seeded(7), dtype=torch.float64)
    eps_hat = torch.randn(SHAPE, generator=seeded(8), dtype=torch.float64)
    for time in (1.5, 7.25, 18.75):
        t = torch.tensor(time, dtype=torch.float64)
        alpha_bar, beta = schedule.alpha_bar_continuous(t), schedule.beta_continuous(t)
        dlambda_dt = -beta / (1 - alpha_bar)
        h = torch.tensor(1e-5, dtype=torch.float64)
        difference = (schedule.log_snr_continuous(t + h) - schedule.log_snr_continuous(t - h)) / (2 * h)
        torch.testing.assert_close(difference, dlambda_dt, rtol=1e-6, atol=0)
        t_drift = -0.5 * beta * (x - eps_hat / (1 - alpha_bar).sqrt())
        log_snr_drift = probability_flow_drift(x, eps_hat, schedule.log_snr_continuous(t))
        torch.testing.assert_close(log_snr_drift, t_drift / dlambda_dt, rtol=1e-10, atol=1e-12)


def gaussian_transport(gaussian: DiffusedMixture, schedule: NoiseSchedule, noise: Tensor) -> Tensor:
    """The exact ODE sample from x_T = noise: the flow keeps (x − √ᾱ μ)/√v along each eigenvector of
    Σ, v = ᾱλ_Σ + 1 − ᾱ, from T to T_MIN; then Tweedie's x̂0 as the sampler takes it."""
    start = schedule.alpha_bar_continuous(torch.tensor(T_MIN, dtype=torch.float64))
    end = schedule.alphas_cumprod[-1]
    mean, eigenvalues, eigenvectors = gaussian.means[0], gaussian.eigenvalues[0], gaussian.eigenvectors[0]
    ratio = ((start * eigenvalues + 1 - start) / (end * eigenvalues + 1 - end)).sqrt()
    x = start.sqrt() * mean + ((noise - end.sqrt() * mean) @ eigenvectors * ratio) @ eigenvectors.T
    return eps_to_x0(x, gaussian.eps_star(x, start), start)


@pytest.mark.parametrize(
    ("schedule_name", "settings", "max_error"),
    [
        ("linear", {"rtol": 1e-5, "atol": 1e-5}, 1e-4),
        ("cosine", {"rtol": 1e-5, "atol": 1e-5}, 1e-4),
        ("linear", {"method": "heun", "steps": 50}, 3e-3),
    ],
)
def test_log_snr_flow_carries_each_noise_draw_to_its_exact_gaussian_sample(
    schedule_name: str, settings: dict, max_error: float
) -> None:
    """Against the closed-form transport of the very x_T drawn: dopri5 lands within 2e-5 and Heun
    uniform in λ within 1.3e-3 at 50 steps (1.3e-3 and 1.1e-2 when they stepped in the table's t);
    and the samples have the Gaussian's mean and covariance."""
    gaussian = DiffusedMixture(torch.ones(1), small_mixture().means[:1], small_mixture().covariances[:1])
    schedule = NoiseSchedule(schedule_name, 1000)

    def eps_star(x: Tensor, t: Tensor) -> Tensor:
        return gaussian.eps_star(x, schedule.alpha_bar_continuous(t))

    num_samples = 2000
    result = sample("ode", eps_star, schedule, (num_samples, 1, 2, 2), seeded(4), **settings)
    noise = torch.randn((num_samples, 4), generator=seeded(4), dtype=torch.float64)
    samples = result.samples.double().reshape(num_samples, 4)
    assert (samples - gaussian_transport(gaussian, schedule, noise)).abs().max() < max_error
    assert_mean_and_covariance(samples, gaussian)
    assert result.nfe == 2 * settings["steps"] + 1 if "steps" in settings else result.nfe < 150
