"""Weightings as the training loss sees them: every head's converted loss is w_ε(t)·‖ε − ε̂‖²/D,
the ELBO losses are the bound itself, and elbo_is is unbiased for it (exact enumeration)."""

from __future__ import annotations

import pytest
import torch

from diffbench.core.diffusion import NoiseSchedule, importance_timesteps, q_sample
from diffbench.core.heads import HEADS
from diffbench.core.likelihood import nats_to_bpd, prior_kl, vlb_term
from diffbench.core.weightings import WEIGHTINGS, LossInputs
from test_diffusion import outputs_for_eps_hat

DTYPE = torch.float64
LEVELS = 17


def batch(seed: int, t: torch.Tensor, schedule: NoiseSchedule) -> dict[str, torch.Tensor]:
    """Data on 17 levels, noise, x_t and a random ε̂ for the given timesteps."""
    generator = torch.Generator().manual_seed(seed)
    shape = (len(t), 1, 4, 4)
    x0 = torch.randint(0, LEVELS, shape, generator=generator).double() / (LEVELS - 1) * 2 - 1
    eps = torch.randn(shape, generator=generator, dtype=DTYPE)
    alpha_bar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    xt = q_sample(x0, eps, alpha_bar)
    eps_hat = eps + 0.3 * torch.randn(shape, generator=generator, dtype=DTYPE)
    return {"x0": x0, "eps": eps, "xt": xt, "eps_hat": eps_hat, "alpha_bar": alpha_bar}


def loss_of(
    weighting: str, head: str, b: dict, t: torch.Tensor, schedule: NoiseSchedule, per_draw
) -> torch.Tensor:
    output = outputs_for_eps_hat(b)[head]
    target = HEADS[head].target(b["x0"], b["eps"], b["alpha_bar"])
    inputs = LossInputs(b["x0"], b["xt"], t, output, target, per_draw, LEVELS, "small")
    return WEIGHTINGS[weighting].loss(HEADS[head], schedule, inputs)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("weighting", [w for w in WEIGHTINGS if not WEIGHTINGS[w].is_bound])
def test_every_head_loss_is_the_eps_space_weight_times_the_eps_error(head: str, weighting: str) -> None:
    schedule = NoiseSchedule("linear", 1000)
    t = torch.tensor([1, 2, 7, 50, 300, 700, 1000])
    b = batch(0, t, schedule)
    eps_error = (b["eps"] - b["eps_hat"]).pow(2).flatten(1).mean(1)
    weight = WEIGHTINGS[weighting].eps_weight(HEADS[head], schedule, t, "small")
    loss = loss_of(weighting, head, b, t, schedule, 1000)
    torch.testing.assert_close(loss, weight * eps_error, rtol=1e-7, atol=0)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("weighting", ["elbo", "elbo_is"])
def test_elbo_losses_are_the_bound_in_bits_per_dim(head: str, weighting: str) -> None:
    """T·L_{t−1} + L_T (bits/dim) with L_{t−1} from `vlb_term`, the decoder at t = 1."""
    schedule = NoiseSchedule("linear", 1000)
    t = torch.tensor([1, 2, 7, 50, 300, 700, 1000])
    b = batch(1, t, schedule)
    term = vlb_term(schedule, b["x0"], b["xt"], t, b["eps_hat"], LEVELS, "small")
    expected = nats_to_bpd(1000 * term + prior_kl(schedule, b["x0"]), 16)
    torch.testing.assert_close(loss_of(weighting, head, b, t, schedule, 1000), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("head", list(HEADS))
def test_elbo_is_is_unbiased_by_exact_enumeration(head: str) -> None:
    """On T = 8, Σ_t p(t)·loss(t)/p(t)-weighted equals the uniform-t expectation of the elbo loss
    (the whole bound): the same x0, noise and ε̂ at every t, every t enumerated."""
    T = 8
    schedule = NoiseSchedule("linear", T)
    t = torch.arange(1, T + 1)
    b = batch(2, t, schedule)
    b = {k: v[:1].expand(T, *v.shape[1:]) if k in ("x0", "eps", "eps_hat") else v for k, v in b.items()}
    b["xt"] = q_sample(b["x0"], b["eps"], b["alpha_bar"])
    weight = WEIGHTINGS["elbo_is"].eps_weight(HEADS[head], schedule, t, "small")
    prob = weight / weight.sum()
    assert (prob > 0).all() and not torch.allclose(prob, torch.full_like(prob, 1 / T))
    importance = loss_of("elbo_is", head, b, t, schedule, 1 / prob)
    uniform = loss_of("elbo", head, b, t, schedule, T)
    expectation_is = (prob * importance).sum()
    expectation_uniform = uniform.mean()
    term = vlb_term(schedule, b["x0"], b["xt"], t, b["eps_hat"], LEVELS, "small")
    whole_bound = nats_to_bpd(term.sum() + prior_kl(schedule, b["x0"][:1]).squeeze(), 16)
    torch.testing.assert_close(expectation_is, expectation_uniform, rtol=1e-10, atol=0)
    torch.testing.assert_close(expectation_is, whole_bound, rtol=1e-10, atol=0)


def test_elbo_is_draws_follow_its_proposal() -> None:
    """The training draw of elbo_is has p(t) ∝ w_ε(t) on 1..T (its marginal, over many batches)."""
    schedule = NoiseSchedule("linear", 10)
    generator = torch.Generator().manual_seed(0)
    draws, per_draw = [], []
    for _ in range(3000):
        t, weight = WEIGHTINGS["elbo_is"].sample_timesteps(schedule, 4, generator, "small")
        draws.append(t)
        per_draw.append(weight)
    t = torch.cat(draws)
    steps = torch.arange(1, 11)
    w = WEIGHTINGS["elbo"].eps_weight(HEADS["eps"], schedule, steps, "small")
    prob = w / w.sum()
    frequency = torch.bincount(t, minlength=11)[1:].double() / len(t)
    torch.testing.assert_close(frequency, prob, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cat(per_draw), 1 / prob[t - 1], rtol=1e-12, atol=0)


def test_importance_timesteps_can_start_at_one() -> None:
    probs = torch.tensor([0.5, 0.25, 0.25], dtype=DTYPE)
    t, p = importance_timesteps(probs, 8, torch.Generator().manual_seed(0), first=1)
    assert t.min() >= 1 and t.max() <= 3
    torch.testing.assert_close(p, probs[t - 1])
    assert (torch.bincount(t, minlength=4)[1:] == torch.tensor([4, 2, 2])).all()
