"""Samplers of `diffbench.samplers`: shapes and dtypes on a tiny denoiser, the identities that tie
them together (respacing over every step, DDIM with η = 1 = ancestral with β̃), and, with the
exact ε* of a small Gaussian mixture, that each one draws from the mixture (mean, covariance)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from diffbench.core.diffusion import NoiseSchedule
from diffbench.data.gmm import DiffusedMixture
from diffbench.sampling.samplers import (
    SAMPLERS,
    ddim,
    ddpm_ancestral,
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


# Enough steps that discretization error stays below the statistical tolerance of 4,000 samples.
EXACT_CASES = [
    ("ancestral", {"clip_x0": False}),
    ("ancestral", {"clip_x0": False, "variance": "small", "steps": 250}),
    ("ddim", {"clip_x0": False, "steps": 200}),
    ("sde", {}),
    ("ode", {"rtol": 1e-4, "atol": 1e-4}),
    ("ode", {"method": "heun", "steps": 100}),
]


@pytest.mark.parametrize(("name", "settings"), EXACT_CASES)
def test_samplers_with_the_exact_denoiser_draw_from_the_mixture(name: str, settings: dict) -> None:
    mixture, schedule = small_mixture(), NoiseSchedule("linear", 1000)

    def eps_star(x: Tensor, t: Tensor) -> Tensor:
        return mixture.eps_star(x, schedule.alpha_bar_continuous(t))

    num_samples = 4000
    samples = sample(name, eps_star, schedule, (num_samples, 1, 2, 2), seeded(4), **settings).samples
    x = samples.double().reshape(num_samples, 4)
    mean, covariance = mixture.mean(), mixture.covariance()
    mean_z = (x.mean(0) - mean) / (covariance.diagonal() / num_samples).sqrt()
    centred = x - x.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    covariance_z = (products.mean(0) - covariance) / (products.std(0) / math.sqrt(num_samples))
    assert mean_z.abs().max() < 4, mean_z
    assert covariance_z.abs().max() < 4, covariance_z
