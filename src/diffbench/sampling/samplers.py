"""Samplers over a denoiser callable (x_t, t) → ε̂: they never know which head made ε̂.

Discrete samplers (ancestral, DDIM) call `eps_fn` with long timesteps 1..T; the SDE and ODE
samplers call it with float64 times t ∈ [T_MIN, T] in the same units, where the schedule's
`alpha_bar_continuous` / `beta_continuous` define the continuous process (the ODE steps in its
log SNR λ and asks the network at t(λ)). Every sampler works in float64, draws all randomness
from the given generator and returns float32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torchdiffeq
from torch import Tensor
from tqdm.auto import tqdm

from diffbench.core.diffusion import (
    NoiseSchedule,
    VarianceType,
    eps_to_score,
    eps_to_x0,
    posterior_mean,
    posterior_variance,
    x0_to_eps,
)

EpsFn = Callable[[Tensor, Tensor], Tensor]
ODEMethod = Literal["dopri5", "heun"]

# The continuous-time samplers and the ODE likelihood stop at (start from) one discrete step:
# it is the smallest t a network trained on t = 1..T has seen, and the score is singular at 0.
T_MIN = 1.0


@dataclass(frozen=True)
class ReverseChain:
    """Per-step float64 coefficients of a reverse chain, first step (largest t) first.

    `timesteps` are the model's own steps; the other tables are those of the chain that jumps
    straight from each kept step to the next one (improved DDPM's respacing), so a chain over
    every step reproduces the schedule's tables.
    """

    timesteps: Tensor
    beta: Tensor
    alpha: Tensor
    alpha_bar: Tensor
    alpha_bar_prev: Tensor
    posterior_variance: Tensor

    def coefficients(self, index: int) -> dict[str, Tensor]:
        """The keyword arguments `posterior_mean` takes, for step `index` of the chain."""
        return {
            "beta": self.beta[index],
            "alpha": self.alpha[index],
            "alpha_bar": self.alpha_bar[index],
            "alpha_bar_prev": self.alpha_bar_prev[index],
        }


def spaced_timesteps(num_timesteps: int, steps: int) -> Tensor:
    """`steps` timesteps from T down to 1, as evenly spaced as integers allow, both ends kept
    (a single step keeps only T, so sampling still starts from pure noise)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps}, got {steps}")
    # floor(x + 0.5) rather than round(): round-half-to-even could merge neighbours 1 apart.
    return (torch.linspace(num_timesteps, 1, steps, dtype=torch.float64) + 0.5).floor().long()


def reverse_chain(schedule: NoiseSchedule, steps: int | None = None) -> ReverseChain:
    """The schedule's own chain over t = T..1 (steps None), or the respaced chain over `steps`
    strided timesteps with β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i+1}} so that its marginals stay those of
    the full chain at the kept steps."""
    device = schedule.betas.device
    if steps is None:
        timesteps = torch.arange(schedule.num_timesteps, 0, -1, device=device)
        return ReverseChain(
            timesteps=timesteps,
            beta=schedule.betas[timesteps],
            alpha=schedule.alphas[timesteps],
            alpha_bar=schedule.alphas_cumprod[timesteps],
            alpha_bar_prev=schedule.alphas_cumprod_prev[timesteps],
            posterior_variance=schedule.posterior_variance[timesteps],
        )
    timesteps = spaced_timesteps(schedule.num_timesteps, steps).to(device)
    alpha_bar = schedule.alphas_cumprod[timesteps]
    alpha_bar_prev = torch.cat([alpha_bar[1:], torch.ones_like(alpha_bar[:1])])
    alpha = alpha_bar / alpha_bar_prev
    beta = 1 - alpha
    return ReverseChain(
        timesteps=timesteps,
        beta=beta,
        alpha=alpha,
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        posterior_variance=posterior_variance(beta, alpha_bar, alpha_bar_prev),
    )


def _noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float64)


def continuous_eps(eps_fn: EpsFn, x: Tensor, t: Tensor | float) -> Tensor:
    """ε̂ (float64) for a float64 state at one real time t, which eps_fn sees as a (B,) tensor."""
    times = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float64)
    return eps_fn(x.float(), times).double()


def _ancestral_chain(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    variance: VarianceType,
    clip_x0: bool,
    steps: int | None,
    progress: bool,
    on_x0: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """The ancestral chain's final x (float64); `on_x0(index, t, x̂0)` sees every step's x̂0, so
    the sampler and the x̂0 trajectory share one loop."""
    device = schedule.betas.device
    chain = reverse_chain(schedule, steps)
    # Only the last step could read σ at its smallest t, and it adds no noise.
    sigma2 = chain.beta if variance == "large" else chain.posterior_variance
    x = _noise(shape, generator, device)
    last = len(chain.timesteps) - 1
    for index in tqdm(range(last + 1), desc="ancestral", disable=not progress, leave=False):
        step = chain.timesteps[index]
        coefficients = chain.coefficients(index)
        eps_hat = eps_fn(x.float(), step.expand(shape[0])).double()
        x0_hat = eps_to_x0(x, eps_hat, coefficients["alpha_bar"])
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        if on_x0 is not None:
            on_x0(index, step, x0_hat)
        x = posterior_mean(x0_hat, x, **coefficients)
        if index < last:
            x = x + sigma2[index].sqrt() * _noise(shape, generator, device)
    return x


@torch.no_grad()
def ddpm_ancestral(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    variance: VarianceType = "large",
    clip_x0: bool = True,
    steps: int | None = None,
    progress: bool = False,
) -> Tensor:
    """DDPM's sampler: x_{t−1} ~ N(μ̃_t(x_t, x̂0), σ_t²) from t = T down to 1, no noise at the end.
    σ_t² = β_t ("large") or β̃_t ("small"); `steps` walks a strided subset with respaced betas for
    fast evaluation. Clipping x̂0 to the data range is the usual choice for sample quality."""
    return _ancestral_chain(eps_fn, schedule, shape, generator, variance, clip_x0, steps, progress).float()


@dataclass(frozen=True)
class X0Trajectory:
    """Final samples (B, …), the model's x̂0 at a few steps (S, B, …) and those steps (S,)."""

    samples: Tensor
    x0_hats: Tensor
    timesteps: Tensor


@torch.no_grad()
def x0_trajectory(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    num_snapshots: int = 10,
    variance: VarianceType = "large",
    clip_x0: bool = True,
    steps: int | None = None,
    progress: bool = False,
) -> X0Trajectory:
    """Run the ancestral chain and keep what the model believes x0 is at `num_snapshots` evenly
    spaced steps (first and last included), the grid that shows when each head commits to an
    image. The samples equal `ddpm_ancestral`'s for the same generator and settings."""
    num_steps = schedule.num_timesteps if steps is None else steps
    if not 1 <= num_snapshots <= num_steps:
        raise ValueError(f"num_snapshots must be in 1..{num_steps}, got {num_snapshots}")
    keep = set(spaced_timesteps(num_steps, num_snapshots).sub(1).tolist())
    kept_steps, x0_hats = [], []

    def keep_snapshot(index: int, step: Tensor, x0_hat: Tensor) -> None:
        if index in keep:
            kept_steps.append(step)
            x0_hats.append(x0_hat.float())

    x = _ancestral_chain(
        eps_fn, schedule, shape, generator, variance, clip_x0, steps, progress, keep_snapshot
    )
    return X0Trajectory(samples=x.float(), x0_hats=torch.stack(x0_hats), timesteps=torch.stack(kept_steps))


@torch.no_grad()
def ddim(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    steps: int = 50,
    eta: float = 0.0,
    clip_x0: bool = True,
    progress: bool = False,
) -> Tensor:
    """DDIM over `steps` strided timesteps: x_s = √ᾱ_s x̂0 + √(1 − ᾱ_s − σ²) ε̂ + σ z with
    σ² = η² β̃' (the respaced posterior variance). η = 0 is deterministic given x_T; η = 1 is the
    respaced ancestral sampler with σ² = β̃. ε̂ is re-derived from a clipped x̂0 so both agree."""
    device = schedule.betas.device
    chain = reverse_chain(schedule, steps)
    x = _noise(shape, generator, device)
    last = len(chain.timesteps) - 1
    for index in tqdm(range(last + 1), desc="ddim", disable=not progress, leave=False):
        alpha_bar, alpha_bar_prev = chain.alpha_bar[index], chain.alpha_bar_prev[index]
        eps_hat = eps_fn(x.float(), chain.timesteps[index].expand(shape[0])).double()
        x0_hat = eps_to_x0(x, eps_hat, alpha_bar)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
            eps_hat = x0_to_eps(x, x0_hat, alpha_bar)
        sigma2 = eta**2 * chain.posterior_variance[index]
        direction = (1 - alpha_bar_prev - sigma2).clamp(min=0).sqrt() * eps_hat
        x = alpha_bar_prev.sqrt() * x0_hat + direction
        if eta > 0 and index < last:
            x = x + sigma2.sqrt() * _noise(shape, generator, device)
    return x.float()


def _denoise(eps_fn: EpsFn, schedule: NoiseSchedule, x: Tensor, t: float) -> Tensor:
    """Tweedie's x̂0 = E[x0 | x_t] at the end of a continuous-time trajectory."""
    alpha_bar = schedule.alpha_bar_continuous(torch.tensor(t, device=x.device))
    return eps_to_x0(x, continuous_eps(eps_fn, x, t), alpha_bar)


@torch.no_grad()
def reverse_sde(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    steps: int = 1000,
    progress: bool = False,
) -> Tensor:
    """Euler–Maruyama on the reverse VP-SDE dx = [−½β x − β ∇log p_t] dt + √β dW̄ with `steps`
    uniform steps from T to T_MIN, then x̂0 at T_MIN (steps + 1 network evaluations)."""
    device = schedule.betas.device
    x = _noise(shape, generator, device)
    grid = torch.linspace(schedule.num_timesteps, T_MIN, steps + 1, dtype=torch.float64, device=device)
    for index in tqdm(range(steps), desc="reverse SDE", disable=not progress, leave=False):
        t, dt = grid[index], grid[index] - grid[index + 1]
        beta = schedule.beta_continuous(t)
        score = eps_to_score(continuous_eps(eps_fn, x, t), schedule.alpha_bar_continuous(t))
        x = x + (0.5 * beta * x + beta * score) * dt + (beta * dt).sqrt() * _noise(shape, generator, device)
    return _denoise(eps_fn, schedule, x, T_MIN).float()


def probability_flow_drift(x: Tensor, eps_hat: Tensor, log_snr: Tensor) -> Tensor:
    """dx/dλ = ½σ²x − ½σε̂ of the probability-flow ODE in λ = log SNR time, σ² = sigmoid(−λ).

    With ᾱ = sigmoid(λ), dλ/dt = −β(t)/σ²(t), so dx/dt = −½β(t)[x + ∇log p_t(x)] becomes
    dx/dλ = ½σ²[x + ∇log p] with the score −ε̂/σ: β(t), piecewise constant in the table's t and
    the reason adaptive solvers crawl there, cancels. Shared by the sampler and the ODE likelihood.
    """
    sigma2 = torch.sigmoid(-log_snr)
    return 0.5 * sigma2 * x - 0.5 * sigma2.sqrt() * eps_hat


def eps_at_log_snr(eps_fn: EpsFn, schedule: NoiseSchedule, x: Tensor, log_snr: Tensor) -> Tensor:
    """ε̂ at one λ (0-dim), asked of eps_fn at the (fractional) t of its own units with that λ."""
    return continuous_eps(eps_fn, x, schedule.t_of_log_snr(log_snr))


def flow_log_snr_range(schedule: NoiseSchedule) -> Tensor:
    """[λ(T), λ(T_MIN)]: where the probability-flow ODE runs, noise end first."""
    ends = torch.tensor([schedule.num_timesteps, T_MIN], dtype=torch.float64, device=schedule.betas.device)
    return schedule.log_snr_continuous(ends)


@torch.no_grad()
def probability_flow(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    method: ODEMethod = "dopri5",
    steps: int = 100,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
) -> Tensor:
    """Integrate the probability-flow ODE from x_T ~ N(0, I) up in λ = log SNR, from λ(T) to
    λ(T_MIN), then take x̂0: adaptively with torchdiffeq's dopri5 (rtol/atol), or with `steps`
    Heun steps uniform in λ (2 network evaluations each). λ rather than t because the drift is
    smooth in λ (`probability_flow_drift`). The evaluations are what `sample` reports as nfe."""
    x = _noise(shape, generator, schedule.betas.device)
    log_snrs = flow_log_snr_range(schedule)

    def drift(log_snr: Tensor, x: Tensor) -> Tensor:
        return probability_flow_drift(x, eps_at_log_snr(eps_fn, schedule, x, log_snr), log_snr)

    if method == "dopri5":
        bar = tqdm(desc="ODE evaluations", disable=not progress, leave=False)

        def counted_drift(log_snr: Tensor, x: Tensor) -> Tensor:
            bar.update()
            return drift(log_snr, x)

        # Land exactly on λ(T_MIN): a step past it would ask the network below its smallest t.
        options = {"step_t": log_snrs[1:]}
        x = torchdiffeq.odeint(
            counted_drift, x, log_snrs, rtol=rtol, atol=atol, method="dopri5", options=options
        )[-1]
        bar.close()
    elif method == "heun":
        grid = torch.linspace(*log_snrs.tolist(), steps + 1, dtype=torch.float64, device=x.device)
        for index in tqdm(range(steps), desc="Heun", disable=not progress, leave=False):
            step = grid[index + 1] - grid[index]
            slope = drift(grid[index], x)
            slope_next = drift(grid[index + 1], x + step * slope)
            x = x + step * 0.5 * (slope + slope_next)
    else:
        raise ValueError(f"unknown ODE method {method!r}; choose 'dopri5' or 'heun'")
    return _denoise(eps_fn, schedule, x, T_MIN).float()


@dataclass(frozen=True)
class SamplerOptions:
    """Settings a sampler may take beside its step count; each sampler reads its own."""

    eta: float = 0.0
    variance: VarianceType = "large"
    method: ODEMethod = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5


@dataclass(frozen=True)
class Sampler:
    """A registered sampler: its function, which of `SamplerOptions` it takes, and whether a step
    count of 0 (every step of the schedule) is valid for it."""

    function: Callable[..., Tensor]
    options: tuple[str, ...]
    every_step: bool = False

    def settings(self, steps: int, options: SamplerOptions) -> dict[str, object]:
        """The keyword settings of a run at `steps`, as its function takes them and as recorded."""
        count = (steps or None) if self.every_step else steps
        return {"steps": count, **{name: getattr(options, name) for name in self.options}}

    def valid_steps(self, steps: int, num_timesteps: int) -> bool:
        """Whether an integer step count fits a schedule of `num_timesteps` (the schema made it one)."""
        return 1 <= steps <= num_timesteps or (self.every_step and steps == 0)


SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(ddpm_ancestral, ("variance",), every_step=True),
    "ddim": Sampler(ddim, ("eta",)),
    "sde": Sampler(reverse_sde, ()),
    "ode": Sampler(probability_flow, ("method", "rtol", "atol")),
}
"""Every sampler by name: the one list the config checks, the evaluation and the benchmarks use."""


class CountedEps:
    """An eps_fn that counts its (batched) calls: a sampler's cost in network evaluations."""

    def __init__(self, eps_fn: EpsFn) -> None:
        self.eps_fn = eps_fn
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.eps_fn(x, t)


@dataclass(frozen=True)
class SampleResult:
    """Samples (float32) and the number of function evaluations (batched eps_fn calls) they cost."""

    samples: Tensor
    nfe: int


def sample(
    name: str,
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    **settings: object,
) -> SampleResult:
    """Run the sampler registered as `name` with its keyword `settings`; nfe is counted rather
    than predicted, so the adaptive ODE solver is recorded the same way as fixed-step samplers."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(sorted(SAMPLERS))}")
    counted = CountedEps(eps_fn)
    samples = SAMPLERS[name].function(counted, schedule, shape, generator, **settings)
    return SampleResult(samples=samples, nfe=counted.calls)
