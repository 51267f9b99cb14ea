"""Lightning callbacks and logger repairs that keep a resumed run's metrics.csv whole."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from diffbench import atomic


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
    writer with the old columns, and write back atomically the rows logged before the checkpoint:
    rows after it were flushed by a later checkpoint that the crash cut short, and are logged again."""
    aside = path.with_name(path.name + ".resume")
    if path.is_file():
        path.replace(aside)
    if not aside.is_file():
        return
    with aside.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    step = header.index("step") if "step" in header else None
    before = [row for row in body if step is None or not row[step] or int(float(row[step])) < resume_step]
    csv_logger.experiment.metrics_keys = header
    buffer = io.StringIO()
    csv.writer(buffer).writerows([header, *before] if header else [])
    atomic.write_text(path, buffer.getvalue())
    aside.unlink()
