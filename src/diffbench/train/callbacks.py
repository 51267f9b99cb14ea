"""Lightning callbacks: stop a diverged run, and logger repairs that keep a resumed run's
metrics.csv whole."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffbench import atomic
from diffbench.train.budgets import LOGGED


class StopOnDivergence(Callback):
    """Stop training at a non-finite loss. Checked every `every` steps, at each step `watch` names
    (where something is measured or saved) and at the last step: one host sync each, not one
    per step. Every process takes the same decision, so DDP stops together."""

    def __init__(self, every: int, watch: Callable[[int], bool] = lambda step: False) -> None:
        self.every = max(1, every)
        self.watch = watch
        self.step: int | None = None
        """The step at which the loss was found non-finite; None while training is healthy."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every and not self.watch(step) and step < (trainer.max_steps or 0):
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            self.step = step
            trainer.should_stop = True


class CheckpointOnStop(Callback):
    """SIGTERM (how SLURM preempts, how `kill` stops a job) makes Lightning stop after a whole
    training step; this saves that step's checkpoint at once (every process takes part), so the
    same command resumes from it, bit for bit, instead of from the last periodic checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.path)


class FlushCSVOnCheckpoint(Callback):
    """Write buffered CSV rows whenever a checkpoint is taken, so a run resumed after a crash
    keeps the metrics logged before it."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()


def keep_previous_metrics(csv_logger: CSVLogger, path: Path, resume_step: int) -> None:
    """Lightning's CSV writer deletes an existing metrics.csv when it starts. On resume, set the
    file aside (a crash here leaves it aside, and the next resume finds it there), start the
    writer with the old columns, and write back atomically the rows logged before the checkpoint
    and the per-budget row of its own step (measured before it was saved, never measured again):
    rows after it were flushed by a later checkpoint that the crash cut short, and are logged again
    (a continued trial's are the shorter run's final validation, which the longer run does not do)."""
    aside = path.with_name(path.name + ".resume")
    if path.is_file():
        path.replace(aside)
    if not aside.is_file():
        return
    with aside.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    step = header.index("step") if "step" in header else None
    budget = [i for i, name in enumerate(header) if name.startswith(LOGGED)]

    def kept(row: list[str]) -> bool:
        if step is None or not row[step]:
            return True
        at = int(float(row[step]))
        return at < resume_step or (at == resume_step and any(row[i] for i in budget if i < len(row)))

    before = [row for row in body if kept(row)]
    csv_logger.experiment.metrics_keys = header
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *before] if header else [])
    atomic.write_text(path, buffer.getvalue())
    aside.unlink()
