"""Negative log-likelihood estimators over a denoiser callable (x_t, t) → ε̂, in bits/dim:
the discrete variational bound (every term, improved-DDPM conventions) and the exact
likelihood of the probability-flow ODE (Hutchinson divergence, uniform dequantization)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torchdiffeq
from torch import Tensor
from tqdm.auto import tqdm

from diffbench.core.diffusion import (
    NoiseSchedule,
    VarianceType,
    elbo_proposal,
    importance_timesteps,
    q_sample,
)
from diffbench.core.likelihood import nats_to_bpd, prior_kl, sum_except_batch, vlb_term
from diffbench.sampling.samplers import EpsFn, eps_at_log_snr, flow_log_snr_range, probability_flow_drift

# torchdiffeq's adaptive Runge–Kutta solvers: the likelihood is only as good as its tolerance.
AdaptiveMethod = Literal["dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun"]


@dataclass(frozen=True)
class VLBResult:
    """The bound per example, split into its terms (all bits/dim).

    total_bpd (B,): prior + weight · Σ terms, weight = T / n (1 for all steps).
    terms_bpd (B, n): L_{t−1} per example at each evaluated t (L_0, the decoder, at t = 1).
    prior_bpd (B,): L_T = KL(q(x_T | x0) ‖ N(0, I)).
    timesteps (n,) or (B, n): the t of each entry of terms_bpd.
    """

    total_bpd: Tensor
    terms_bpd: Tensor
    prior_bpd: Tensor
    timesteps: Tensor

    @property
    def mean_terms_bpd(self) -> Tensor:
        """Batch mean of each term: where along t the model spends its bits."""
        return self.terms_bpd.mean(0)


def stratified_timesteps(
    num_timesteps: int, count: int, generator: torch.Generator, batch: int | None = None
) -> Tensor:
    """t = 1 (the decoder term), then one uniform t from each of `count` equal strata of 1..T
    (the first stratum without t = 1), for an unbiased, low-variance `vlb_bpd` estimate with
    `stratified_weights`. The decoder is evaluated for every image because, drawn like any other
    t, it would be a rare term carrying weight T / count. With `batch`, each example draws its own
    (batch, count + 1) set, so the standard error over examples also covers the timestep draw."""
    if count < 1 or num_timesteps % count or num_timesteps // count < 2:
        raise ValueError(
            f"count must divide the number of timesteps ({num_timesteps}) into strata of at least "
            f"two steps, got {count}"
        )
    width = num_timesteps // count
    shape = (count,) if batch is None else (batch, count)
    device = generator.device
    offsets = torch.randint(0, width, shape, generator=generator, device=device)
    first = torch.randint(1, width, shape[:-1] + (1,), generator=generator, device=device)
    offsets = torch.cat([first, offsets[..., 1:]], dim=-1)
    steps = 1 + width * torch.arange(count, device=device) + offsets
    return torch.cat([torch.ones(shape[:-1] + (1,), dtype=steps.dtype, device=device), steps], dim=-1)


def stratified_weights(num_timesteps: int, count: int) -> Tensor:
    """How many of the T terms each entry of `stratified_timesteps` stands for: 1 for t = 1, the
    rest of the first stratum for its draw, a whole stratum for every other draw."""
    width = num_timesteps // count
    return torch.tensor([1.0, width - 1.0] + [float(width)] * (count - 1), dtype=torch.float64)


@torch.no_grad()
def vlb_bpd(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    num_levels: int | None,
    generator: torch.Generator,
    variance: VarianceType = "small",
    timesteps: Tensor | None = None,
    batch_timesteps: int = 10,
    progress: bool = False,
    weights: Tensor | None = None,
) -> VLBResult:
    """The discrete VLB L_T + Σ_t L_{t−1} of each example in x0, one x_t ~ q(x_t | x0) per term.

    With `timesteps` None every t = 1..T is evaluated (the reported NLL bound); otherwise only
    those t, each weighted by how many terms it stands for: `weights` (n,) or (B, n), e.g.
    `stratified_weights` or 1 / p(t) for importance-sampled t, or T / n, which is unbiased when
    they are drawn uniformly. Timesteps have shape (n,), shared by all examples, or (B, n), one
    set per example.
    `batch_timesteps` timesteps share one eps_fn call of batch B · batch_timesteps. The noise
    for the i-th evaluated t is drawn as its own (B, …) tensor, so results do not depend on
    batch_timesteps.
    """
    num_timesteps = schedule.num_timesteps
    device = x0.device
    steps = torch.arange(1, num_timesteps + 1, device=device) if timesteps is None else timesteps.to(device)
    x0 = x0.double()
    batch, num_dims = x0.shape[0], x0[0].numel()
    per_example = steps.expand(batch, -1) if steps.ndim == 1 else steps
    if per_example.shape[0] != batch or steps.numel() == 0 or steps.min() < 1 or steps.max() > num_timesteps:
        raise ValueError(f"timesteps must be (n,) or (B, n) steps in 1..{num_timesteps}")
    num_terms = per_example.shape[1]
    repeat = (1,) * (x0.ndim - 1)
    terms = torch.empty(batch, num_terms, dtype=torch.float64, device=device)
    starts = range(0, num_terms, batch_timesteps)
    for start in tqdm(starts, desc="VLB terms", disable=not progress, leave=False):
        chunk = per_example[:, start : start + batch_timesteps].T
        t = chunk.reshape(-1)
        x0_repeated = x0.repeat(len(chunk), *repeat)
        noise = torch.cat(
            [torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float64) for _ in chunk]
        )
        xt = q_sample(x0_repeated, noise, schedule.at(schedule.alphas_cumprod, t, x0.ndim)).float()
        nats = vlb_term(schedule, x0_repeated, xt, t, eps_fn(xt, t), num_levels, variance)
        terms[:, start : start + len(chunk)] = nats.view(len(chunk), batch).T
    prior = prior_kl(schedule, x0)
    if weights is None:
        weights = torch.full((num_terms,), num_timesteps / num_terms, dtype=torch.float64)
    total = prior + (terms * weights.to(device=device, dtype=torch.float64)).sum(1)
    return VLBResult(
        total_bpd=nats_to_bpd(total, num_dims),
        terms_bpd=nats_to_bpd(terms, num_dims),
        prior_bpd=nats_to_bpd(prior, num_dims),
        timesteps=steps,
    )


def one_term_vlb_bpd(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    num_levels: int | None,
    generator: torch.Generator,
    t: Tensor,
    prob: Tensor,
    variance: VarianceType = "small",
) -> Tensor:
    """L_T + L_0 + L_{t−1}/p(t) per example (bits/dim) for one t ≥ 2 per image drawn with
    probability p(t): unbiased for the whole bound, the decoder L_0 evaluated for every image."""
    first = torch.ones_like(t)
    return vlb_bpd(
        eps_fn,
        schedule,
        x0,
        num_levels,
        generator,
        variance=variance,
        timesteps=torch.stack([first, t], dim=1),
        weights=torch.stack([torch.ones_like(prob), 1 / prob], dim=1),
        batch_timesteps=2,
    ).total_bpd


def importance_vlb_bpd(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    num_levels: int | None,
    generator: torch.Generator,
    variance: VarianceType = "small",
) -> Tensor:
    """`one_term_vlb_bpd` with p(t) ∝ the ELBO's ε-weight, where its terms are large: about 40×
    less spread than a uniform t, whose rare small-t draws dominate the estimate."""
    t, prob = importance_timesteps(elbo_proposal(schedule, variance, first=2), len(x0), generator)
    return one_term_vlb_bpd(eps_fn, schedule, x0, num_levels, generator, t, prob, variance)


@dataclass(frozen=True)
class ODEResult:
    """Per-example bits/dim (B,) and the number of ODE right-hand-side evaluations (each one
    forward pass plus num_probes vector-Jacobian products)."""

    bpd: Tensor
    nfe: int


@torch.no_grad()
def ode_nll_bpd(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    x0: Tensor,
    num_levels: int | None,
    generator: torch.Generator,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    num_probes: int = 1,
    method: AdaptiveMethod = "dopri5",
    progress: bool = False,
) -> ODEResult:
    """−log p(x0) under the probability-flow ODE, in bits/dim, for each example.

    The ODE runs in λ = log SNR, where its drift f = dx/dλ is smooth (`probability_flow_drift`;
    in the table's t, β(t) jumps at every step: dopri5 needs ~6× the evaluations at 1e-5 and
    stops converging when tightened). The data
    point is the state at λ_max = λ(T_MIN), integrated down to λ_min = λ(T) together with
    ∫ div f dλ, so log p_{T_MIN}(x) = log N(x_T; 0, I) + ∫_{λ_max}^{λ_min} div f dλ
    (instantaneous change of variables, in the drift's own variable). div f is Hutchinson's
    estimate E_v[vᵀ(∂f/∂x)v] with `num_probes` Rademacher probes drawn once, so the ODE stays
    deterministic for the solver; eps_fn must therefore be differentiable in x (not wrapped in
    torch.no_grad). nfe counts the right-hand-side evaluations the solver made.

    Continuous data (num_levels None): bpd = −log p(x0) / (D ln 2), a density.
    Discrete data on L levels in [−1, 1] (values 2k/(L−1) − 1, k = 0..L−1): x = x0 + u with
    u ~ U(−1/(L−1), 1/(L−1))^D fills x0's bin of width Δ = 2/(L−1), and Jensen gives
    −log P(x0) ≤ E_u[−log p(x0 + u)] − D log Δ; the −D log Δ turns a density over [−1, 1] into
    the mass of a bin, i.e. the density of the integer data k (bins of width 1). Hence
    bpd = −log p(x) / (D ln 2) + log2((L − 1) / 2), e.g. +6.99 for 8-bit data, +3 for L = 17:
    one dequantization draw gives an unbiased estimate of that upper bound on the discrete NLL.
    """
    x = x0.double()
    batch, num_dims = x.shape[0], x[0].numel()
    if num_levels is not None:
        half_bin = 1.0 / (num_levels - 1)
        uniform = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float64)
        x = x + (2 * uniform - 1) * half_bin
    signs = torch.randint(0, 2, (num_probes, *x.shape), generator=generator, device=x.device)
    probes = (2 * signs - 1).double()
    bar = tqdm(desc="ODE likelihood evaluations", disable=not progress, leave=False)
    nfe = 0

    def dynamics(log_snr: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        bar.update()
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            eps_hat = eps_at_log_snr(eps_fn, schedule, x, log_snr)
            # Checked on ε̂: the drift depends on x directly too, so it would hide a missing graph.
            if not eps_hat.requires_grad:
                raise RuntimeError(
                    "eps_fn must be differentiable in x for the ODE likelihood (no torch.no_grad)"
                )
            drift = probability_flow_drift(x, eps_hat, log_snr)
            divergence = torch.zeros(batch, dtype=torch.float64, device=x.device)
            for index, probe in enumerate(probes):
                (vjp,) = torch.autograd.grad(drift, x, probe, retain_graph=index < num_probes - 1)
                divergence += sum_except_batch(vjp * probe)
        return drift.detach(), divergence / num_probes

    log_snrs = flow_log_snr_range(schedule).flip(0).to(x.device)
    initial = (x, torch.zeros(batch, dtype=torch.float64, device=x.device))
    # Land exactly on λ(T) rather than step past the end of the schedule.
    options = {"step_t": log_snrs[1:]}
    path, divergence_integral = torchdiffeq.odeint(
        dynamics, initial, log_snrs, rtol=rtol, atol=atol, method=method, options=options
    )
    bar.close()
    x_end = path[-1]
    prior_log_prob = -0.5 * sum_except_batch(x_end**2) - 0.5 * num_dims * math.log(2 * math.pi)
    nll = -(prior_log_prob + divergence_integral[-1])
    if num_levels is not None:
        nll = nll - num_dims * math.log(2.0 / (num_levels - 1))
    return ODEResult(bpd=nats_to_bpd(nll, num_dims), nfe=nfe)


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    """Mean and its standard error (sample std / √n) over a test set of per-example values."""
    values = values.double().flatten()
    if values.numel() < 2:
        raise ValueError("a standard error needs at least two values")
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()
