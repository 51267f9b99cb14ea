"""A callback that measures the model at each training budget, keeps the rows in the checkpoint
(so a resumed run has the whole table) and writes them to the run directory as it goes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from diffbench.train.module import DiffusionModule

Measure = Callable[[DiffusionModule], dict[str, float]]
LOGGED = "budget/"
"""The prefix of the per-budget metrics in the loggers (metrics.csv, W&B)."""


class BudgetEvaluation(Callback):
    """At each step in `steps` (after that step's optimizer and EMA update), rank zero calls
    `measure(module)` and records {"step": s, **metrics}; `on_row` sees the table after each row."""

    def __init__(self, steps: list[int], measure: Measure, on_row: Callable[[list[dict]], None]) -> None:
        self.steps = set(steps)
        self.measure = measure
        self.on_row = on_row
        self.rows: list[dict] = []

    def record(self, trainer: L.Trainer, module: DiffusionModule) -> None:
        step = trainer.global_step
        if (
            step not in self.steps
            or any(row["step"] == step for row in self.rows)
            or not trainer.is_global_zero
            or trainer.should_stop  # a diverged run (StopOnDivergence runs first) is not measured
        ):
            return
        self.rows.append({"step": step, **self.measure(module)})
        self.on_row(self.rows)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{LOGGED}{k}": v for k, v in self.rows[-1].items() if k != "step"}, step=step
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.record(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The rows of this run's budgets: a run continuing a shorter trial drops the row of that
        trial's last step where the longer run measures none (20 steps, budgets 250 · 2^k: the
        20-step run measured at 20, a 40-step run measures at 40 only)."""
        self.rows = [row for row in state_dict["rows"] if row["step"] in self.steps]
