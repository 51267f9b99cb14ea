"""The module, datamodule and trainer of a run, from its resolved config: the one place config
keys become constructor arguments."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from diffbench.core.arms import Arm
from diffbench.core.unet import UNet
from diffbench.data import build_datamodule as datamodule_by_name
from diffbench.data.base import ArrayDataModule
from diffbench.rundir import CHECKPOINTS
from diffbench.tracking import quiet_wandb_environment, wandb_mode
from diffbench.train.callbacks import FlushCSVOnCheckpoint
from diffbench.train.module import DiffusionModule

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
# Training batches are a function of the step (data.base.StepBatches) and a resumed run starts at
# its checkpoint's step, so Lightning's warning that the loader holds no state does not apply.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


THREADS_ENV = "DIFFBENCH_THREADS"


def set_threads(cfg: DictConfig) -> int:
    """torch's intra-op threads for this process: `speed.threads`, else $DIFFBENCH_THREADS (the
    sweep sets it to cores / parallel trials), else every core. Chosen, never torch's guess: two
    processes each using every core slow each other down many times over."""
    threads = cfg.speed.threads or int(os.environ.get(THREADS_ENV, 0)) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def build_datamodule(cfg: DictConfig) -> ArrayDataModule:
    """The run's datamodule; the split is fixed by the run's seed."""
    return datamodule_by_name(OmegaConf.merge(cfg.data, {"seed": cfg.seed}))


def build_net(cfg: DictConfig) -> UNet:
    model_args = {k: v for k, v in cfg.model.items() if k != "name"}
    return UNet(**OmegaConf.to_container(OmegaConf.create(model_args)))


def build_module(cfg: DictConfig, num_levels: int | None) -> DiffusionModule:
    return DiffusionModule(
        build_net(cfg),
        head=cfg.objective.head,
        weighting=cfg.objective.weighting,
        schedule=cfg.diffusion.schedule,
        num_timesteps=cfg.diffusion.num_timesteps,
        variance=cfg.diffusion.variance,
        num_levels=num_levels,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        ema_decay=cfg.optim.ema_decay,
        channels_last=cfg.speed.channels_last,
        compile=cfg.speed.compile,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        fused=cfg.speed.fused_adamw,
        seed=cfg.seed,
    )


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """Lightning's Trainer with the W&B and CSV loggers, step checkpoints and the given callbacks;
    `cfg.trainer` is passed through unchanged."""
    quiet_wandb_environment()
    head, weighting = cfg.objective.head, cfg.objective.weighting
    wandb_logger = WandbLogger(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        save_dir=str(run_dir),
        name=f"{cfg.experiment}-s{cfg.seed}-{run_dir.name}",
        group=Arm(head, weighting).label,
        job_type="train",
        tags=[head, weighting, cfg.data.name],
        mode=wandb_mode(cfg.wandb.mode),
        config={**OmegaConf.to_container(cfg, resolve=True), "arm": Arm(head, weighting).label},
    )
    csv_logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINTS,
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.run.checkpoint_every,
        save_last=True,
        save_top_k=-1,
    )
    trainer_args = {k: v for k, v in cfg.trainer.items() if k != "name"}
    # A run shorter than the validation interval validates at its end rather than failing.
    trainer_args["val_check_interval"] = min(cfg.trainer.val_check_interval, cfg.trainer.max_steps)
    return L.Trainer(
        **OmegaConf.to_container(OmegaConf.create(trainer_args)),
        check_val_every_n_epoch=None,
        default_root_dir=str(run_dir),
        logger=[wandb_logger, csv_logger],
        callbacks=[
            FlushCSVOnCheckpoint(),
            *callbacks,
            checkpoint,
            LearningRateMonitor(logging_interval="step"),
        ],
    )
