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

from diffbench.core.unet import UNet
from diffbench.data import build_datamodule as datamodule_by_name
from diffbench.data.base import ArrayDataModule
from diffbench.rundir import CHECKPOINTS, STEP_CHECKPOINT
from diffbench.spec import RunSpec, TrainerSpec
from diffbench.tracking import quiet_wandb_environment, settle_wandb_mode
from diffbench.train.callbacks import FlushCSVOnCheckpoint
from diffbench.train.module import DiffusionModule

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
# Training batches are a function of the step (data.base.StepBatches) and a resumed run starts at
# its checkpoint's step, so Lightning's warning that the loader holds no state does not apply.
warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
# A run that continues a shorter trial loads that trial's checkpoint, whose checkpoint callback
# wrote elsewhere: Lightning then (rightly) keeps none of its paths, and says so.
warnings.filterwarnings("ignore", message=".*The dirpath has changed from.*")


THREADS_ENV = "DIFFBENCH_THREADS"


def set_threads(spec: RunSpec) -> int:
    """torch's intra-op threads for this process: `speed.threads`, else $DIFFBENCH_THREADS (the
    sweep sets it to cores / parallel trials), else every core. Chosen, never torch's guess: two
    processes each using every core slow each other down many times over."""
    threads = spec.speed.threads or int(os.environ.get(THREADS_ENV, 0)) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def build_datamodule(spec: RunSpec) -> ArrayDataModule:
    """The run's datamodule: its split fixed by data.split_seed, its batch order by the run's seed."""
    data = spec.data
    options = {
        **data.options,
        "batch_size": data.batch_size,
        "split_seed": data.split_seed,
        "seed": spec.seed,
    }
    return datamodule_by_name(data.name, options)


def build_net(spec: RunSpec) -> UNet:
    """The U-Net, initialised from the run's seed: nn.Module's initialisers take no generator, so
    they run in a fork of torch's generator seeded by it, and the global state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return UNet(**spec.model.arguments())


def build_module(spec: RunSpec, num_levels: int | None) -> DiffusionModule:
    return DiffusionModule(
        build_net(spec),
        head=spec.arm.head,
        weighting=spec.arm.weighting,
        schedule=spec.diffusion.schedule,
        num_timesteps=spec.diffusion.num_timesteps,
        variance=spec.diffusion.variance,
        num_levels=num_levels,
        lr=spec.optim.lr,
        weight_decay=spec.optim.weight_decay,
        warmup_steps=spec.optim.warmup_steps,
        ema_decay=spec.optim.ema_decay,
        channels_last=spec.speed.channels_last,
        compile=spec.speed.compile,
        gradient_clip_val=spec.optim.gradient_clip_val,
        fused=spec.speed.fused_adamw,
        seed=spec.seed,
    )


def validation_interval(trainer: TrainerSpec, max_steps: int) -> int:
    """Training steps between validations: `trainer.val_check_interval`, capped at the budget so a
    run shorter than the interval validates at its end rather than failing. The one setting of the
    training loop that depends on the budget."""
    return min(trainer.val_check_interval, max_steps)


def build_trainer(spec: RunSpec, run_dir: Path, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """Lightning's Trainer with the W&B and CSV loggers, step checkpoints and the given callbacks;
    the `trainer` settings are passed through unchanged."""
    quiet_wandb_environment()
    arm, output = spec.arm, spec.output
    wandb_logger = WandbLogger(
        project=output.wandb_project,
        entity=output.wandb_entity,
        save_dir=str(run_dir),
        name=f"{spec.experiment}-s{spec.seed}-{run_dir.name}",
        group=arm.label,
        job_type="train",
        tags=[arm.head, arm.weighting, spec.data.name],
        mode=settle_wandb_mode(output.wandb_mode),
        config={**spec.resolved, "arm": arm.label},
    )
    csv_logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINTS,
        filename=STEP_CHECKPOINT,
        auto_insert_metric_name=False,
        every_n_train_steps=output.checkpoint_every,
        save_last=True,
        save_top_k=-1,
    )
    trainer_args = spec.trainer.arguments()
    trainer_args["val_check_interval"] = validation_interval(spec.trainer, spec.max_steps)
    return L.Trainer(
        **trainer_args,
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
