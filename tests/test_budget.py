"""Per-budget evaluation: the budgets, the log-SNR grid and its cell widths, and the distance to
ε* (plain and ELBO-weighted) against closed forms on a small exact mixture."""

from __future__ import annotations

import math

import pytest
import torch

from diffbench.core.diffusion import NoiseSchedule
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.data.gmm import DiffusedMixture
from diffbench.evaluation.budget import budget_steps
from diffbench.evaluation.groundtruth import eps_star_summary, logsnr_timesteps


def test_budgets_double_from_the_base_and_end_at_the_last_step() -> None:
    assert budget_steps(3000, 250) == [250, 500, 1000, 2000, 3000]
    assert budget_steps(2000, 250) == [250, 500, 1000, 2000]
    assert budget_steps(100, 250) == [100]
    assert budget_steps(600, 0) == [600]


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_logsnr_grid_cells_cover_every_timestep_once(name: str) -> None:
    schedule = NoiseSchedule(name, 1000)
    t, width = logsnr_timesteps(schedule, 20)
    assert torch.all(t[1:] > t[:-1]) and t[0] == 1 and t[-1] == 1000
    assert width.sum() == 1000 and (width >= 1).all()
    owner = torch.cat([torch.full((int(w),), int(s)) for s, w in zip(t, width)])
    distance = (torch.arange(1, 1001)[:, None] - t[None, :]).abs() - 1e-6 * t[None, :]  # ties go up
    nearest = t[distance.argmin(1)]
    assert torch.equal(owner, nearest)
    gaps = -(schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])).log().diff()
    if name == "linear":  # the cosine schedule's last integer steps are coarse in log SNR
        assert gaps.std() < 0.35 * gaps.mean()


def small_mixture() -> DiffusedMixture:
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    factors = 0.3 * torch.randn(2, 4, 4, generator=generator, dtype=torch.float64)
    covariances = factors @ factors.transpose(1, 2) + 0.1 * torch.eye(4, dtype=torch.float64)
    return DiffusedMixture(torch.tensor([0.6, 0.4]), means, covariances)


def test_eps_star_distance_is_zero_at_the_optimum_and_weighted_by_the_elbo_off_it() -> None:
    """With ε̂ = ε* + δ (a constant vector, ‖δ‖²/D = c) the distance is c at every t, and with a
    grid dense enough to hold every t (widths 1) the ELBO-weighted sum is c Σ_{t≥2} w_ε(t) / ln 2."""
    T, dense = 50, 5000
    schedule = NoiseSchedule("linear", T)
    mixture = small_mixture()
    x0 = mixture.sample(64, torch.Generator().manual_seed(1)).float().reshape(64, 1, 2, 2)

    def eps_fn(offset: float):
        def call(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            alpha_bar = schedule.alphas_cumprod[t.long()]
            return mixture.eps_star(xt, alpha_bar).reshape(xt.shape) + offset

        return call

    exact = eps_star_summary(
        eps_fn(0.0), mixture, schedule, x0, torch.Generator().manual_seed(2), count=dense
    ).summary
    assert exact["eps_star_mse"] < 1e-10 and exact["eps_star_elbo_bpd"] < 1e-10
    assert torch.equal(logsnr_timesteps(schedule, dense)[0], torch.arange(1, T + 1))
    off = eps_star_summary(
        eps_fn(0.1), mixture, schedule, x0, torch.Generator().manual_seed(2), count=dense
    ).summary
    weights = WEIGHTINGS["elbo"].eps_weight(HEADS["eps"], schedule, torch.arange(2, T + 1), "small")
    assert off["eps_star_mse"] == pytest.approx(0.01, rel=1e-5)
    assert off["eps_star_elbo_bpd"] == pytest.approx(0.01 * weights.sum().item() / math.log(2), rel=1e-5)
