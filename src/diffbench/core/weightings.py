"""Weightings: how much the loss cares about ‖ε − ε̂‖² at each t (in the spirit of EDM's
`training/loss.py`). Each is defined once by its ε-space weight w_ε(t); a head's own loss is
w_ε(t) · c_head(t) · ‖target − output‖², with c_head from `diffbench.core.heads`. Adding one is
a class of a few lines and one registry entry. The ELBO weightings instead return the bound
itself in bits/dim, so their training curve is an NLL bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from diffbench.core.diffusion import (
    NoiseSchedule,
    VarianceType,
    elbo_proposal,
    elbo_weight_at,
    importance_timesteps,
    snr,
)
from diffbench.core.heads import Head
from diffbench.core.likelihood import elbo_loss_term, nats_to_bpd, prior_kl


@dataclass(frozen=True)
class LossInputs:
    """One training batch as every weighting sees it. `terms_per_draw` is how many of the T
    terms each drawn t stands for: T for uniform t, 1/p(t) for importance-sampled t."""

    x0: Tensor
    xt: Tensor
    t: Tensor
    output: Tensor
    target: Tensor
    terms_per_draw: Tensor | int
    num_levels: int | None
    variance: VarianceType


class Weighting:
    """A per-t weight on the ε-space error, and the t-distribution it is trained under."""

    name: ClassVar[str]
    source: ClassVar[str]
    is_bound: ClassVar[bool] = False

    def eps_weight(self, head: Head, schedule: NoiseSchedule, t: Tensor, variance: VarianceType) -> Tensor:
        """w_ε(t), float64, for integer t in 1..T."""
        raise NotImplementedError

    def head_weight(self, head: Head, schedule: NoiseSchedule, t: Tensor, variance: VarianceType) -> Tensor:
        """The same weight on the head's own squared error: w_ε(t) · c_head(t)."""
        weight = self.eps_weight(head, schedule, t, variance)
        return weight * head.eps_factor(schedule.alphas_cumprod[t])

    def sample_timesteps(
        self, schedule: NoiseSchedule, batch: int, generator: torch.Generator, variance: VarianceType
    ) -> tuple[Tensor, Tensor | int]:
        """t uniform on 1..T from the step's generator, each standing for T terms."""
        t = torch.randint(
            1, schedule.num_timesteps + 1, (batch,), device=generator.device, generator=generator
        )
        return t, schedule.num_timesteps

    def loss(self, head: Head, schedule: NoiseSchedule, batch: LossInputs) -> Tensor:
        """Per-example weighted mean squared error of the head's own target."""
        mse = (batch.output.double() - batch.target).pow(2).flatten(1).mean(1)
        return self.head_weight(head, schedule, batch.t, batch.variance).flatten() * mse

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Elbo(Weighting):
    """The VLB itself: T · L_{t−1} for uniform t (the decoder L_0 at t = 1) plus L_T, in bits/dim."""

    name = "elbo"
    source = "the variational bound (DDPM's L_vlb)"
    is_bound = True

    def eps_weight(self, head: Head, schedule: NoiseSchedule, t: Tensor, variance: VarianceType) -> Tensor:
        return elbo_weight_at(schedule, t, variance)

    def loss(self, head: Head, schedule: NoiseSchedule, batch: LossInputs) -> Tensor:
        x0, num_dims = batch.x0, batch.x0[0].numel()
        term = elbo_loss_term(
            head,
            schedule,
            batch.output,
            batch.target,
            x0,
            batch.xt,
            batch.t,
            batch.num_levels,
            batch.variance,
        )
        return nats_to_bpd(batch.terms_per_draw * term + prior_kl(schedule, x0), num_dims)


class ElboIS(Elbo):
    """The same bound with t ~ p(t) ∝ w_ε(t) on 1..T, each term reweighted by 1/p(t): a proposal
    with no state (unlike improved DDPM's loss history), so resumes and DDP ranks agree exactly."""

    name = "elbo_is"
    source = "importance-sampled VLB (improved DDPM's L_vlb with a fixed proposal)"

    def sample_timesteps(
        self, schedule: NoiseSchedule, batch: int, generator: torch.Generator, variance: VarianceType
    ) -> tuple[Tensor, Tensor]:
        t, prob = importance_timesteps(elbo_proposal(schedule, variance, first=1), batch, generator, first=1)
        return t, 1 / prob


class SNRWeighting(Weighting):
    """A weighting that is a function of SNR(t) alone."""

    def of_snr(self, ratio: Tensor) -> Tensor:
        raise NotImplementedError

    def eps_weight(self, head: Head, schedule: NoiseSchedule, t: Tensor, variance: VarianceType) -> Tensor:
        return self.of_snr(snr(schedule.alphas_cumprod[t]))


class EpsMSE(SNRWeighting):
    name, source = "eps", "DDPM's L_simple"

    def of_snr(self, ratio: Tensor) -> Tensor:
        return torch.ones_like(ratio)


class X0MSE(SNRWeighting):
    name, source = "x0", "unweighted x0 MSE"

    def of_snr(self, ratio: Tensor) -> Tensor:
        return 1 / ratio


class ScoreMSE(SNRWeighting):
    name, source = "score", "unweighted score MSE: 1/(1 − ᾱ)"

    def of_snr(self, ratio: Tensor) -> Tensor:
        return 1 + ratio


class VMSE(SNRWeighting):
    name, source = "v", "v-prediction MSE (Salimans & Ho 2022): 1/ᾱ"

    def of_snr(self, ratio: Tensor) -> Tensor:
        return 1 + 1 / ratio


class MinSNR(SNRWeighting):
    name, source = "minsnr", "Min-SNR-γ (Hang et al. 2023), γ = 5"
    gamma = 5.0

    def of_snr(self, ratio: Tensor) -> Tensor:
        return (self.gamma / ratio).clamp(max=1.0)


class EDM(SNRWeighting):
    name, source = "edm", "EDM's λ(σ) = (σ² + σ_d²)/(σ σ_d)² with σ² = 1/SNR, σ_d = 0.5"
    sigma_data = 0.5

    def of_snr(self, ratio: Tensor) -> Tensor:
        return 1 + 1 / (self.sigma_data**2 * ratio)


class Own(Weighting):
    """The head's own unweighted MSE, i.e. w_ε = 1/c_head: a different weighting for every head."""

    name, source = "own", "the head's unweighted MSE (the 'simple' arms)"

    def eps_weight(self, head: Head, schedule: NoiseSchedule, t: Tensor, variance: VarianceType) -> Tensor:
        return 1 / head.eps_factor(schedule.alphas_cumprod[t])

    def head_weight(self, head: Head, schedule: NoiseSchedule, t: Tensor, variance: VarianceType) -> Tensor:
        return torch.ones_like(schedule.alphas_cumprod[t])


WEIGHTINGS: dict[str, Weighting] = {
    w.name: w for w in (Elbo(), ElboIS(), EpsMSE(), X0MSE(), ScoreMSE(), VMSE(), MinSNR(), EDM(), Own())
}


def get_weighting(name: str) -> Weighting:
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; choose one of {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[name]
