"""Heads: what the network's raw output means (in the spirit of EDM's preconditioning wrappers).

A head holds three things: the target it is regressed on, the exact conversion of its output to
ε̂, and its ε-space factor c(t) with ‖ε − ε̂‖² = c(t) · ‖target − output‖². Everything downstream
(weightings, samplers, likelihoods) sees only ε̂, so adding a head is one class and one registry
line. `Denoiser` turns a network and a head into the (x_t, t) → ε̂ callable samplers consume.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from diffbench.core import diffusion
from diffbench.core.diffusion import NoiseSchedule, snr


class Head:
    """One parameterization of the denoiser; subclasses override the three methods."""

    name: ClassVar[str]
    description: ClassVar[str]

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        raise NotImplementedError

    def to_eps(self, output: Tensor, xt: Tensor, alpha_bar: Tensor) -> Tensor:
        raise NotImplementedError

    def eps_factor(self, alpha_bar: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsHead(Head):
    name = "eps"
    description = "the noise ε (DDPM)"

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        return eps

    def to_eps(self, output: Tensor, xt: Tensor, alpha_bar: Tensor) -> Tensor:
        return output

    def eps_factor(self, alpha_bar: Tensor) -> Tensor:
        return torch.ones_like(alpha_bar)


class X0Head(Head):
    name = "x0"
    description = "the clean image x0"

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        return x0

    def to_eps(self, output: Tensor, xt: Tensor, alpha_bar: Tensor) -> Tensor:
        return diffusion.x0_to_eps(xt, output, alpha_bar)

    def eps_factor(self, alpha_bar: Tensor) -> Tensor:
        return snr(alpha_bar)


class ScoreHead(Head):
    name = "score"
    description = "the score ∇log q_t(x_t) = −ε/√(1 − ᾱ)"

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        return diffusion.eps_to_score(eps, alpha_bar)

    def to_eps(self, output: Tensor, xt: Tensor, alpha_bar: Tensor) -> Tensor:
        return diffusion.score_to_eps(output, alpha_bar)

    def eps_factor(self, alpha_bar: Tensor) -> Tensor:
        return 1 - alpha_bar


class VHead(Head):
    name = "v"
    description = "the velocity v = √ᾱ ε − √(1 − ᾱ) x0 (Salimans & Ho 2022)"

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        return diffusion.v_target(x0, eps, alpha_bar)

    def to_eps(self, output: Tensor, xt: Tensor, alpha_bar: Tensor) -> Tensor:
        return diffusion.v_to_eps(xt, output, alpha_bar)

    def eps_factor(self, alpha_bar: Tensor) -> Tensor:
        return alpha_bar


HEADS: dict[str, Head] = {head.name: head for head in (EpsHead(), X0Head(), ScoreHead(), VHead())}


def get_head(name: str) -> Head:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    return HEADS[name]


class Denoiser:
    """A network read through a head: ε̂(x_t, t) for any integer or fractional t, computed in
    float64 after the network's own dtype, so samplers and likelihoods never see the head."""

    def __init__(
        self,
        net: nn.Module,
        head: Head,
        schedule: NoiseSchedule,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        self.net = net
        self.head = head
        self.schedule = schedule
        self.memory_format = memory_format

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def output(self, xt: Tensor, t: Tensor) -> Tensor:
        """The network's raw output (float32) for a batch; grad mode is the caller's."""
        dtype = next(self.net.parameters()).dtype
        xt = xt.to(dtype).contiguous(memory_format=self.memory_format)
        return self.net(xt, t.to(dtype)).float()

    def alpha_bar(self, t: Tensor, ndim: int) -> Tensor:
        """ᾱ at integer or fractional t, shaped to broadcast against the data."""
        return self.schedule.alpha_bar_continuous(t).reshape(-1, *([1] * (ndim - 1)))

    def __call__(self, xt: Tensor, t: Tensor) -> Tensor:
        """ε̂(x_t, t) in x_t's dtype; the ODE likelihood differentiates through it."""
        alpha_bar = self.alpha_bar(t, xt.ndim)
        return self.head.to_eps(self.output(xt, t).double(), xt.double(), alpha_bar).to(xt.dtype)

    def x0(self, xt: Tensor, t: Tensor) -> Tensor:
        alpha_bar = self.alpha_bar(t, xt.ndim)
        return diffusion.eps_to_x0(xt.double(), self(xt, t).double(), alpha_bar).to(xt.dtype)

    def score(self, xt: Tensor, t: Tensor) -> Tensor:
        alpha_bar = self.alpha_bar(t, xt.ndim)
        return diffusion.eps_to_score(self(xt, t).double(), alpha_bar).to(xt.dtype)
