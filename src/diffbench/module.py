"""Training, EMA and validation for every arm; the ε-, x0- and score-prediction modules differ
only in what the network regresses on and how its output converts to ε̂."""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from diffbench import diffusion
from diffbench.diffusion import Head, NoiseSchedule, VarianceType
from diffbench.likelihood import elbo_loss_term, nats_to_bpd, prior_kl, vlb_term
from diffbench.nll import importance_timesteps, vlb_bpd

WEIGHTINGS = ("simple", "elbo")


class DiffusionModule(L.LightningModule):
    """One arm: a head (set by the subclass) trained with `weighting` ∈ {simple, elbo}."""

    head: Head

    def __init__(
        self,
        net: nn.Module,
        weighting: str = "simple",
        schedule: str = "linear",
        num_timesteps: int = 1000,
        variance: VarianceType = "small",
        num_levels: int | None = 17,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        ema_decay: float = 0.999,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ValueError(f"objective.weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.ema = copy.deepcopy(net).requires_grad_(False)
        self.schedule = NoiseSchedule(schedule, num_timesteps)
        self.num_timesteps = num_timesteps
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()
            self.ema.compile()
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("loss", "eps_mse", "vlb_bpd")})

    def target(self, x0: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        """What the network output is regressed on."""
        return diffusion.head_target(self.head, x0, eps, alpha_bar)

    def output_to_eps(self, output: Tensor, xt: Tensor, alpha_bar: Tensor) -> Tensor:
        """The ε̂ implied by the network's raw output."""
        return diffusion.to_eps(self.head, output, xt, alpha_bar)

    def network_output(self, xt: Tensor, t: Tensor, use_ema: bool = False) -> Tensor:
        net = self.ema if use_ema else self.net
        dtype = next(net.parameters()).dtype
        xt = xt.to(dtype).contiguous(memory_format=self.memory_format)
        return net(xt, t.to(dtype)).float()

    def eps_hat(self, xt: Tensor, t: Tensor, use_ema: bool = True) -> Tensor:
        """ε̂(x_t, t) for samplers and metrics, whatever the head; t may be fractional. Grad mode
        is the caller's: the ODE likelihood differentiates through it."""
        output = self.network_output(xt, t, use_ema)
        alpha_bar = self.alpha_bar_at(t, xt.ndim)
        return self.output_to_eps(output.double(), xt.double(), alpha_bar).to(xt.dtype)

    def x0_hat(self, xt: Tensor, t: Tensor, use_ema: bool = True) -> Tensor:
        alpha_bar = self.alpha_bar_at(t, xt.ndim)
        return diffusion.eps_to_x0(xt.double(), self.eps_hat(xt, t, use_ema).double(), alpha_bar).to(xt.dtype)

    def score_hat(self, xt: Tensor, t: Tensor, use_ema: bool = True) -> Tensor:
        alpha_bar = self.alpha_bar_at(t, xt.ndim)
        return diffusion.eps_to_score(self.eps_hat(xt, t, use_ema).double(), alpha_bar).to(xt.dtype)

    def alpha_bar_at(self, t: Tensor, ndim: int) -> Tensor:
        """ᾱ at integer or fractional t, shaped to broadcast against the data."""
        return self.schedule.alpha_bar_continuous(t).reshape(-1, *([1] * (ndim - 1)))

    def loss_terms(self, x0: Tensor, t: Tensor, eps: Tensor, use_ema: bool = False) -> dict[str, Tensor]:
        """Per-example own loss, ε-space squared error and one-sample VLB estimate (bits/dim)."""
        alpha_bar = self.schedule.at(self.schedule.alphas_cumprod, t, x0.ndim)
        xt = diffusion.q_sample(x0.double(), eps.double(), alpha_bar).float()
        output = self.network_output(xt, t, use_ema)
        target = self.target(x0.double(), eps.double(), alpha_bar)
        num_dims = x0[0].numel()
        eps_hat = self.output_to_eps(output.double(), xt.double(), alpha_bar)
        levels = self.hparams.num_levels
        variance = self.hparams.variance
        vlb_nats = self.num_timesteps * vlb_term(self.schedule, x0, xt, t, eps_hat, levels, variance)
        vlb_bpd = nats_to_bpd(vlb_nats + prior_kl(self.schedule, x0), num_dims)
        if self.hparams.weighting == "elbo":
            term = elbo_loss_term(self.head, self.schedule, output, target, x0, xt, t, levels, variance)
            loss = nats_to_bpd(self.num_timesteps * term + prior_kl(self.schedule, x0), num_dims)
        else:
            loss = (output.double() - target).pow(2).flatten(1).mean(1)
        eps_mse = (eps_hat - eps.double()).pow(2).flatten(1).mean(1)
        return {"loss": loss, "eps_mse": eps_mse, "vlb_bpd": vlb_bpd}

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(
            1, self.num_timesteps + 1, (batch_size,), device=self.device, generator=generator
        )

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x0 = batch[0]
        t = self.sample_timesteps(len(x0))
        terms = self.loss_terms(x0, t, torch.randn_like(x0))
        loss = terms["loss"].mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/eps_mse", terms["eps_mse"].mean())
        self.log("train/vlb_bpd", terms["vlb_bpd"].mean())
        return loss.float()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        """EMA with a short warm-up so brief runs are not dominated by the initial weights."""
        step = self.global_step
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            ema_params = list(self.ema.parameters())
            torch._foreach_lerp_(ema_params, list(self.net.parameters()), 1 - decay)
            for ema_buffer, buffer in zip(self.ema.buffers(), self.net.buffers()):
                ema_buffer.copy_(buffer)

    def vlb_estimate_bpd(self, x0: Tensor, t: Tensor, prob: Tensor, generator: torch.Generator) -> Tensor:
        """L_T + L_0 + L_{t−1}/p(t) per example (bits/dim, EMA weights) for t ≥ 2 drawn with
        probability p(t): unbiased for the whole bound, the decoder L_0 evaluated for every image."""
        first = torch.ones_like(t)
        return vlb_bpd(
            self.eps_hat,
            self.schedule,
            x0,
            self.hparams.num_levels,
            generator,
            variance=self.hparams.variance,
            timesteps=torch.stack([first, t], dim=1),
            weights=torch.stack([torch.ones_like(prob), 1 / prob], dim=1),
            batch_timesteps=2,
        ).total_bpd

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        """Same timesteps and noise for every arm and every validation pass (seeded by batch). The
        VLB is importance-sampled with p(t) ∝ the ELBO's ε-weight, where its terms are large: a
        uniform t makes the estimate heavy-tailed (a few small-t draws dominate it)."""
        x0 = batch[0]
        generator = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        t = self.sample_timesteps(len(x0), generator)
        eps = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        terms = self.loss_terms(x0, t, eps, use_ema=True)
        proposal = diffusion.implied_eps_weight(self.schedule, "eps", "elbo", self.hparams.variance)
        t_vlb, prob = importance_timesteps(proposal / proposal.sum(), len(x0), generator)
        terms["vlb_bpd"] = self.vlb_estimate_bpd(x0, t_vlb, prob, generator)
        if self.hparams.weighting == "elbo":
            terms["loss"] = terms["vlb_bpd"]
        for name, metric in self.val_metrics.items():
            metric.update(terms[name].float())

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric.compute(), prog_bar=name == "vlb_bpd", sync_dist=False)
            metric.reset()

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class EpsPrediction(DiffusionModule):
    """Predicts the noise ε (DDPM)."""

    head = "eps"


class X0Prediction(DiffusionModule):
    """Predicts the clean image x0."""

    head = "x0"


class ScorePrediction(DiffusionModule):
    """Predicts the score ∇log q_t(x_t) directly."""

    head = "score"


MODULES: dict[str, type[DiffusionModule]] = {
    "eps": EpsPrediction,
    "x0": X0Prediction,
    "score": ScorePrediction,
}
