"""Training, EMA and validation for every arm: one LightningModule whose head and weighting are
constructor arguments (objects from `diffbench.core`)."""

from __future__ import annotations

import contextlib
import copy
import statistics
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from diffbench.core import diffusion
from diffbench.core.diffusion import NoiseSchedule, VarianceType
from diffbench.core.heads import Denoiser, get_head
from diffbench.core.likelihood import nats_to_bpd, prior_kl, vlb_term
from diffbench.core.weightings import LossInputs, get_weighting
from diffbench.sampling.nll import importance_vlb_bpd
from diffbench.seeding import Streams, validation_stream

PENDING_STEPS = 100
"""Steps of gradient norms held on the device between copies to the host."""
OPTIMISATION_KEY = "diffbench_optimisation"
"""Where a checkpoint keeps the per-step gradient norms."""


def optimizer_implementation(fused: bool, device: torch.device) -> dict[str, bool]:
    """AdamW's fused kernel where the device has one (about 1.1x per step on CPU), else foreach:
    the same update to float tolerance, so the choice is speed, not science."""
    if fused and device.type in ("cpu", "cuda"):
        return {"fused": True}
    return {"foreach": True}


class DiffusionModule(L.LightningModule):
    """One arm: a head (how the output becomes ε̂) trained with a weighting (how much each t counts)."""

    def __init__(
        self,
        net: nn.Module,
        head: str = "eps",
        weighting: str = "own",
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
        gradient_clip_val: float | None = None,
        fused: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.head = get_head(head)
        self.weighting = get_weighting(weighting)
        self.net = net
        self.ema = copy.deepcopy(net).requires_grad_(False)
        self.schedule = NoiseSchedule(schedule, num_timesteps)
        self.num_timesteps = num_timesteps
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)
        if compile:
            self.net.compile()
            self.ema.compile()
        self.streams = Streams(seed)
        self.has_dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in net.modules())
        self.online = Denoiser(self.net, self.head, self.schedule, memory_format)
        self.denoiser = Denoiser(self.ema, self.head, self.schedule, memory_format)
        """The EMA network read through the head: what samplers, likelihoods and metrics use."""
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("loss", "eps_mse", "vlb_bpd")})
        self.grad_norms: list[float] = []
        """Every optimizer step's gradient norm before clipping, on the host (kept in checkpoints)."""
        self.clipped_steps = 0
        self._pending: list[Tensor] = []
        """(norm, clipped) per step still on the device: copied over in bulk to avoid a sync per step."""

    def loss_terms(
        self,
        x0: Tensor,
        t: Tensor,
        eps: Tensor,
        terms_per_draw: Tensor | int,
        use_ema: bool = False,
        diagnostics: bool = True,
    ) -> dict[str, Tensor]:
        """Per-example loss of the arm's weighting and ε-space squared error; with `diagnostics`,
        also the one-sample VLB estimate (bits/dim), unbiased for any t-distribution since each
        term counts for the terms its draw stands for."""
        alpha_bar = self.schedule.at(self.schedule.alphas_cumprod, t, x0.ndim)
        xt = diffusion.q_sample(x0.double(), eps.double(), alpha_bar).float()
        output = (self.denoiser if use_ema else self.online).output(xt, t)
        target = self.head.target(x0.double(), eps.double(), alpha_bar)
        num_dims = x0[0].numel()
        eps_hat = self.head.to_eps(output.double(), xt.double(), alpha_bar)
        levels = self.hparams.num_levels
        variance = self.hparams.variance
        batch = LossInputs(x0, xt, t, output, target, terms_per_draw, levels, variance)
        terms = {
            "loss": self.weighting.loss(self.head, self.schedule, batch),
            "eps_mse": (eps_hat - eps.double()).pow(2).flatten(1).mean(1),
        }
        if diagnostics:
            vlb_nats = terms_per_draw * vlb_term(self.schedule, x0, xt, t, eps_hat, levels, variance)
            terms["vlb_bpd"] = nats_to_bpd(vlb_nats + prior_kl(self.schedule, x0), num_dims)
        return terms

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """The step's t and ε come from the stream of (seed, step, process) alone, so a run resumed
        from a checkpoint draws exactly what the uninterrupted run drew, with no RNG state to carry
        in the checkpoint. Torch's global generator is never read: dropout, which takes no
        generator, draws from a fork of it seeded from the same stream."""
        x0 = batch[0]
        generator = self.streams.step(self.global_step, self.global_rank, self.device)
        t, terms_per_draw = self.weighting.sample_timesteps(
            self.schedule, len(x0), generator, self.hparams.variance
        )
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        logging = self.trainer._logger_connector.should_update_logs if self._trainer else True
        with self.dropout_rng():
            terms = self.loss_terms(x0, t, eps, terms_per_draw, diagnostics=logging)
        loss = terms["loss"].mean()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/eps_mse", terms["eps_mse"].mean())
        if logging:
            self.log("train/vlb_bpd", terms["vlb_bpd"].mean())
        return loss.float()

    @contextlib.contextmanager
    def dropout_rng(self) -> Iterator[None]:
        """For a network with dropout, a fork of torch's generator seeded for this step and
        process (on the host: no device sync) and restored afterwards; without dropout, nothing."""
        if not self.has_dropout:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.streams.dropout_seed(self.global_step, self.global_rank))
            yield

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The EMA follows each optimizer step inside it, so checkpoints and per-budget measurements
        taken at the end of a batch see the EMA of that very step."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema(self.global_step + 1)

    def update_ema(self, step: int) -> None:
        """EMA with a short warm-up so brief runs are not dominated by the initial weights; `step`
        counts optimizer steps including this one."""
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            ema_params = list(self.ema.parameters())
            torch._foreach_lerp_(ema_params, list(self.net.parameters()), 1 - decay)
            for ema_buffer, buffer in zip(self.ema.buffers(), self.net.buffers()):
                ema_buffer.copy_(buffer)

    @property
    def clipping(self) -> bool:
        """Lightning clips by norm only for a positive `gradient_clip_val`."""
        clip = self.hparams.gradient_clip_val
        return clip is not None and clip > 0

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log the total gradient norm before Lightning clips it (right after this hook) and whether
        the threshold bit: one threshold can clip one weighting every step and never touch another."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads).detach()
        clipped = (norm > self.hparams.gradient_clip_val).float() if self.clipping else torch.zeros_like(norm)
        self.log("train/grad_norm", norm)
        self.log("train/clipped", clipped)
        self._pending.append(torch.stack([norm.float(), clipped]))
        if len(self._pending) >= PENDING_STEPS:
            self._collect_grad_norms()

    def _collect_grad_norms(self) -> None:
        """Move the pending per-step norms and clip flags to host floats (one copy for many steps)."""
        if not self._pending:
            return
        rows = torch.stack(self._pending).tolist()
        self._pending.clear()
        self.grad_norms.extend(norm for norm, _ in rows)
        self.clipped_steps += sum(int(flag) for _, flag in rows)

    def optimisation_record(self) -> dict[str, float | int | None]:
        """The run's `optimisation` record: how often clipping acted and how large gradients were."""
        self._collect_grad_norms()
        norms, steps = self.grad_norms, len(self.grad_norms)
        clip = self.hparams.gradient_clip_val
        return {
            "gradient_clip_val": None if clip is None else float(clip),
            "clipped_fraction": self.clipped_steps / steps if steps else None,
            "grad_norm_median": statistics.median(norms) if steps else None,
            "grad_norm_max": max(norms) if steps else None,
            "steps_measured": steps,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the per-step norms so a resumed run's record covers the steps before the crash."""
        self._collect_grad_norms()
        checkpoint[OPTIMISATION_KEY] = {
            "grad_norms": torch.tensor(self.grad_norms, dtype=torch.float64),
            "clipped_steps": self.clipped_steps,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Checkpoints written before the record existed start it empty (`steps_measured` says so)."""
        record = checkpoint.get(OPTIMISATION_KEY, {"grad_norms": torch.zeros(0), "clipped_steps": 0})
        self._pending.clear()
        self.grad_norms = record["grad_norms"].tolist()
        self.clipped_steps = int(record["clipped_steps"])

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        """Same timesteps and noise for every arm and every validation pass (seeded by batch). The
        VLB is importance-sampled with p(t) ∝ the ELBO's ε-weight, where its terms are large: a
        uniform t makes the estimate heavy-tailed (a few small-t draws dominate it)."""
        x0 = batch[0]
        generator = validation_stream(batch_idx, self.device)
        t = torch.randint(1, self.num_timesteps + 1, (len(x0),), device=self.device, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        terms = self.loss_terms(x0, t, eps, self.num_timesteps, use_ema=True)
        levels, variance = self.hparams.num_levels, self.hparams.variance
        terms["vlb_bpd"] = importance_vlb_bpd(self.denoiser, self.schedule, x0, levels, generator, variance)
        if self.weighting.is_bound:
            terms["loss"] = terms["vlb_bpd"]
        for name, metric in self.val_metrics.items():
            metric.update(terms[name].float())

    def on_validation_epoch_end(self) -> None:
        for name, metric in self.val_metrics.items():
            self.log(f"val/{name}", metric.compute(), prog_bar=name == "vlb_bpd", sync_dist=False)
            metric.reset()

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(
            self.net.parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            **optimizer_implementation(self.hparams.fused, self.device),
        )
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
