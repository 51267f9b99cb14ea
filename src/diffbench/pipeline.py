"""The training-and-evaluation sequence of one run, from its spec: fit (resuming from the newest
checkpoint that loads), measure the cheap metrics at every budget, evaluate, and write
results.json last; a diverged run stops cleanly with its own record. The command line around it
is `cli/run.py`."""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import lightning as L
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffbench import atomic
from diffbench.core.unet import count_parameters
from diffbench.data.base import ArrayDataModule
from diffbench.evaluation.budget import budget_metrics, budget_steps
from diffbench.evaluation.evaluate import evaluate
from diffbench.evaluation.plots import save_grid
from diffbench.rundir import (
    COMPLETE,
    CONTINUED,
    CURVES,
    DIVERGED,
    IMAGES,
    LAST_CHECKPOINT,
    SAMPLE_GRID,
    RunDir,
    ShorterTrial,
    config_hash,
    make_run_dir,
    media_key,
    read_continuation,
    shorter_trials,
    step_checkpoint,
    write_continuation,
)
from diffbench.sampling.samplers import ddpm_ancestral
from diffbench.spec import RunSpec
from diffbench.tracking import FINAL, run_started, wandb_summary
from diffbench.train.budgets import BudgetEvaluation
from diffbench.train.build import build_datamodule, build_module, build_trainer, validation_interval
from diffbench.train.callbacks import CheckpointOnStop, StopOnDivergence, keep_previous_metrics
from diffbench.train.module import DiffusionModule


def completed_results(run_dir: RunDir, spec: RunSpec) -> dict | None:
    """The results of a finished (or diverged) run of this very config in `run_dir`, if any."""
    results = run_dir.final_results()
    return results if results is not None and results.get("config_hash") == config_hash(spec) else None


class Stopped(Exception):
    """The run was asked to stop (SIGTERM) and saved its checkpoint: a rerun resumes it."""


def watched(spec: RunSpec, budget: list[int]) -> Callable[[int], bool]:
    """Whether something is measured or saved at a step: a diverged network must not reach it."""
    budgets = set(budget)
    every = (spec.output.checkpoint_every, spec.trainer.val_check_interval)
    return lambda step: step in budgets or any(step % interval == 0 for interval in every)


def draw_samples(spec: RunSpec, module: DiffusionModule, path: Path, shape: tuple[int, ...]) -> dict:
    """A grid from the EMA model with DDPM's plain ancestral sampler over all T steps."""
    generator = spec.streams.evaluation("sample_grid", device=module.device)
    count = spec.sample_grid_images
    start = time.perf_counter()
    samples = ddpm_ancestral(
        module.denoiser,
        module.schedule,
        (count, *shape),
        generator,
        variance=spec.evaluation.ancestral_variance,
        progress=True,
    )
    save_grid(samples, path, nrow=math.ceil(count**0.5))
    return {
        "file": path.name,
        "sampler": "ancestral",
        "steps": module.num_timesteps,
        "num_images": count,
        "variance": spec.evaluation.ancestral_variance,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }


def train(spec: RunSpec) -> dict:
    """Fit one arm, evaluate it, and return what `results.json` records (rank zero)."""
    datamodule = build_datamodule(spec)
    datamodule.setup()
    run_dir = RunDir(make_run_dir(spec))
    done = completed_results(run_dir, spec)
    if done:
        print(
            f"[diffbench] {spec.experiment} seed {spec.seed}: already {done['status']} "
            f"in {run_dir.path}; skipping"
        )
        return done
    datamodule.train_samples = spec.max_steps * spec.data.batch_size
    module = build_module(spec, datamodule.num_levels)
    steps = budget_steps(spec.max_steps, spec.evaluation.budget_base)
    budgets = BudgetEvaluation(
        steps, lambda module: measure_budget(module, datamodule, spec), run_dir.write_budgets
    )
    divergence = StopOnDivergence(spec.trainer.log_every_n_steps, watched(spec, steps))
    callbacks = [divergence, budgets, CheckpointOnStop(run_dir.checkpoints / LAST_CHECKPOINT)]
    trainer = build_trainer(spec, run_dir.path, callbacks)
    if trainer.is_global_zero and not run_started(lambda: trainer.loggers[0].experiment):
        trainer = build_trainer(spec, run_dir.path, callbacks)
    with run_dir.exclusive() if trainer.is_global_zero else contextlib.nullcontext():
        return fit_and_evaluate(spec, run_dir, datamodule, module, trainer, budgets, divergence, steps)


@dataclass(frozen=True)
class Continuation:
    """Where a run with no checkpoint of its own starts instead of step 0: the last checkpoint of a
    finished shorter trial with every other setting equal."""

    source: ShorterTrial
    checkpoint: Path

    @property
    def record(self) -> dict:
        """What results.json says under `continued_from`."""
        return {"run_dir": str(self.source.run_dir.path), "step": self.source.steps}


def budget_dependence(spec: RunSpec, shorter: ShorterTrial, budgets: list[int]) -> str | None:
    """Why this run would not be `shorter` continued, or None when it would be, bit for bit. The
    learning rate (warm-up, then constant), the EMA's warm-up, the batches and every random draw
    are functions of the step alone; what can differ is how the shorter run ended, its validation
    schedule (the interval is capped at the budget) and the per-budget rows it measured; whether its
    last checkpoint loads is `plan_continuation`'s test."""
    results, steps = shorter.results, shorter.steps
    if results.get("status") != COMPLETE:
        return f"it diverged at step {results.get('diverged_at_step')}, and so would this run"
    if results.get("steps") != steps:
        return f"it stopped at step {results.get('steps')} of its {steps}"
    there, here = validation_interval(spec.trainer, steps), validation_interval(spec.trainer, spec.max_steps)
    if there != here:
        return (
            f"it validated every {there} steps and this run validates every {here} "
            f"(trainer.val_check_interval={spec.trainer.val_check_interval} is capped at the budget)"
        )
    measured = {row.get("step") for row in results.get("budgets") or []}
    missing = [step for step in budgets if step <= steps and step not in measured]
    if missing:
        return f"it has no per-budget row at step {', '.join(map(str, missing))}"
    return None


def plan_continuation(spec: RunSpec, budgets: list[int]) -> tuple[Continuation | None, str | None]:
    """The longest finished shorter trial of this config to continue, or None with the reason it
    cannot be (None without one when there is no such trial). It reads, never writes."""
    trials = shorter_trials(spec)
    if not trials:
        return None, None
    shorter = trials[0]
    why = budget_dependence(spec, shorter, budgets)
    checkpoint = None
    if why is None:
        # Loading is the test of a checkpoint: done once, and only for a trial that qualifies.
        checkpoint, step, _ = shorter.run_dir.latest_checkpoint()
        if checkpoint is None or step != shorter.steps:
            why = f"it has no loadable checkpoint of its last step ({shorter.steps})"
    if why or checkpoint is None:
        where = f"{shorter.run_dir.path} ({shorter.steps} steps)"
        return None, f"not continuing from {where}: {why}; training from scratch"
    return Continuation(shorter, checkpoint), None


def copy_continuation(plan: Continuation, run_dir: RunDir, budgets: list[int]) -> Path:
    """Copy (never move) what the resume path reads from the shorter trial: its metrics.csv, its
    per-budget rows at this run's budgets, and last its checkpoint, whose presence makes a rerun
    resume here. The record goes first, so a continued run that is interrupted still knows where
    it came from. Returns the copied checkpoint."""
    write_continuation(run_dir, plan.record)
    source = plan.source.run_dir
    if source.metrics_csv.is_file():
        atomic.save_with(run_dir.metrics_csv, lambda tmp: shutil.copyfile(source.metrics_csv, tmp))
    rows = [row for row in plan.source.results.get("budgets") or [] if row.get("step") in budgets]
    if rows:
        run_dir.write_budgets(rows)
    target = run_dir.checkpoints / step_checkpoint(plan.source.steps)
    return atomic.save_with(target, lambda tmp: shutil.copyfile(plan.checkpoint, tmp))


def fit_and_evaluate(
    spec: RunSpec,
    run_dir: RunDir,
    datamodule: ArrayDataModule,
    module: DiffusionModule,
    trainer: L.Trainer,
    budgets: BudgetEvaluation,
    divergence: StopOnDivergence,
    steps: list[int],
) -> dict:
    """Train from the newest loadable checkpoint, else from a finished shorter trial's (copied
    here), else from scratch, then evaluate; rank zero writes results.json last. The caller holds
    the directory's lock."""
    num_params = count_parameters(module.net)
    last, resume_step, damaged = run_dir.latest_checkpoint()
    continued = read_continuation(run_dir) if last else None
    plan, why = (None, None) if last else plan_continuation(spec, steps)
    if plan:
        continued, resume_step = plan.record, plan.source.steps
        # Every process loads the same weights: rank zero its copy, the others the original.
        last = copy_continuation(plan, run_dir, steps) if trainer.is_global_zero else plan.checkpoint
    elif last is None and trainer.is_global_zero:
        (run_dir / CONTINUED).unlink(missing_ok=True)
    if trainer.is_global_zero:
        run_dir.write_config(spec)
        print(
            f"[diffbench] {spec.experiment}: U-Net with {num_params:,} parameters; "
            f"run directory {run_dir.path}"
        )
        for path in damaged:
            print(f"[diffbench] checkpoint {path} cannot be loaded (damaged or cut short); passing over it")
    if why and trainer.is_global_zero:
        print(f"[diffbench] {why}")
    if plan and trainer.is_global_zero:
        source, to_train = plan.source.run_dir.path, spec.max_steps - resume_step
        print(f"[diffbench] continuing from {source} at step {resume_step} ({to_train} steps to train)")
    elif last and trainer.is_global_zero:
        print(f"[diffbench] resuming the interrupted run from {last} (step {resume_step})")
    if last and trainer.is_global_zero:
        keep_previous_metrics(trainer.loggers[1], run_dir.metrics_csv, resume_step)
    datamodule.resume_step = resume_step
    if plan:  # the shorter run's last epoch ended at its last step: this one spans the steps left
        datamodule.train_samples = (spec.max_steps - resume_step) * spec.data.batch_size
    for logger in trainer.loggers:
        logger.log_hyperparams({"num_params": num_params})
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last else None, weights_only=True)
    except SIGTERMException:
        raise Stopped(
            f"stopped by SIGTERM at step {trainer.global_step} of {spec.max_steps}; its checkpoint is in "
            f"{run_dir.checkpoints}. Run the same command again to resume it exactly from there."
        ) from None
    train_seconds = time.perf_counter() - start
    identity = {
        "experiment": spec.experiment,
        "arm": spec.arm.label,
        "head": spec.arm.head,
        "weighting": spec.arm.weighting,
        "profile": spec.profile,
        "config_hash": config_hash(spec),
        "seed": spec.seed,
        "data": spec.data.name,
        "model": spec.resolved["model"]["name"],
        "num_params": num_params,
        "run_dir": str(run_dir.path),
        "continued_from": continued,
    }
    if divergence.step is not None:
        return record_divergence(spec, run_dir, trainer, module, budgets, identity, divergence.step)
    stop = (
        f"stopped by SIGTERM after training, while evaluating; the trained network is in "
        f"{run_dir.checkpoints}. Run the same command again to evaluate it."
    )
    if trainer.received_sigterm:  # it came as fit was ending: Lightning noted it and finished
        raise Stopped(stop)
    with stopping_on_sigterm(stop):
        return evaluate_and_record(
            spec, run_dir, datamodule, module, trainer, budgets, identity, train_seconds
        )


@contextlib.contextmanager
def stopping_on_sigterm(message: str) -> Iterator[None]:
    """Outside `trainer.fit` Lightning only notes a SIGTERM and carries on, so a stop during the
    evaluation would finish it and exit 0: here the signal raises `Stopped` instead (Lightning's
    own handler, inside `trainer.validate`, calls this one too)."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Stopped(message)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except SIGTERMException:
        raise Stopped(message) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def evaluate_and_record(
    spec: RunSpec,
    run_dir: RunDir,
    datamodule: ArrayDataModule,
    module: DiffusionModule,
    trainer: L.Trainer,
    budgets: BudgetEvaluation,
    identity: dict,
    train_seconds: float,
) -> dict:
    """The final validation, the evaluation and the sample grid of a trained network; rank zero
    writes results.json last."""
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    module.to(trainer.strategy.root_device)
    evaluation, eval_seconds = (
        evaluate(module.denoiser, datamodule, spec, run_dir) if spec.evaluation.enabled else (None, 0.0)
    )
    if not trainer.is_global_zero:
        return {}
    shape = datamodule.image_shape
    grid = draw_samples(spec, module, run_dir / SAMPLE_GRID, shape) if spec.sample_grid_images else None
    results = {
        "status": COMPLETE,
        **identity,
        "steps": trainer.global_step,
        "train_wall_time_s": round(train_seconds, 2),
        "eval_wall_time_s": eval_seconds,
        "metrics": {
            **{key: float(value) for key, value in final.items()},
            **(evaluation.metrics if evaluation else {}),
        },
        "evaluation": evaluation.settings if evaluation else {},
        "optimisation": module.optimisation_record(),
        "budgets": budgets.rows,
        "samples": grid,
        "spec": spec.record(),
    }
    log_to_wandb(trainer.loggers[0], results, run_dir, trainer.global_step)
    run_dir.write_results(results)
    trainer.loggers[0].experiment.finish()
    print_summary(results)
    return results


def reevaluate(spec: RunSpec, run_dir: RunDir, checkpoint: Path, results: dict | None) -> dict:
    """A finished run's network (its newest checkpoint) evaluated again with `spec`'s evaluation
    settings; the new metrics and settings replace the old ones in results.json, written under the
    directory's lock. `python -m diffbench.evaluate` is the command around it."""
    datamodule = build_datamodule(spec)
    module = build_module(spec, datamodule.num_levels)
    module.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    with run_dir.exclusive():
        evaluation, seconds = evaluate(module.denoiser, datamodule, spec, run_dir)
        results = dict(results or {"status": COMPLETE, "run_dir": str(run_dir.path)})
        results["metrics"] = {**(results.get("metrics") or {}), **evaluation.metrics}
        results["evaluation"] = {**(results.get("evaluation") or {}), **evaluation.settings}
        results["eval_wall_time_s"] = seconds
        run_dir.write_results(results)
    return results


def record_divergence(
    spec: RunSpec,
    run_dir: RunDir,
    trainer: L.Trainer,
    module: DiffusionModule,
    budgets: BudgetEvaluation,
    identity: dict,
    step: int,
) -> dict:
    """A run whose loss went non-finite: results.json with status `diverged`, the step, the budget
    rows measured before it and no metrics (nothing is evaluated on a broken network)."""
    reason = (
        f"the training loss was not finite (NaN or infinite) at step {step} of {spec.max_steps}; "
        f"training stopped there and nothing was evaluated. Try a smaller optim.lr "
        f"(now {spec.optim.lr:g}) or set trainer.gradient_clip_val."
    )
    print(f"[diffbench] {identity['arm']} seed {spec.seed} diverged: {reason}", file=sys.stderr)
    if not trainer.is_global_zero:
        return {}
    results = {
        "status": DIVERGED,
        **identity,
        "steps": step,
        "diverged_at_step": step,
        "reason": reason,
        "metrics": {},
        "evaluation": {},
        "optimisation": module.optimisation_record(),
        "budgets": budgets.rows,
        "samples": None,
        "spec": spec.record(),
    }
    run_dir.write_results(results)
    trainer.loggers[0].experiment.summary.update(wandb_summary(results))
    trainer.loggers[0].experiment.finish()
    return results


def measure_budget(module: DiffusionModule, datamodule: ArrayDataModule, spec: RunSpec) -> dict[str, float]:
    """The cheap metrics of the EMA network in eval mode. They draw from their own stream, and
    training reads no global generator, so a measurement cannot change the training after it."""
    mode = module.ema.training
    module.ema.eval()
    metrics = budget_metrics(module.denoiser, datamodule, spec)
    module.ema.train(mode)
    return metrics


def log_to_wandb(logger: WandbLogger, results: dict, run_dir: RunDir, step: int) -> None:
    """Final metrics as the run's summary (what W&B's runs table and grouping by `arm`
    aggregate) with the rest of what the report reads, the per-budget rows included
    (`tracking.wandb_summary`), the per-t curves as tables and the images."""
    run = logger.experiment
    for key in results["metrics"]:
        run.define_metric(f"{FINAL}{key}", summary="last")
    run.summary.update(wandb_summary(results))
    for curve in CURVES:
        if (values := run_dir.read_curve(curve)) is not None:
            table = wandb.Table(columns=list(curve.columns), data=[list(row) for row in zip(*values)])
            run.log({f"curves/{curve.name}": table})
    for name in IMAGES:
        if (run_dir / name).is_file():
            logger.log_image(key=media_key(name), images=[str(run_dir / name)], step=step)


def print_summary(results: dict) -> None:
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(results["metrics"].items()))
    print(
        f"\n[diffbench] {results['arm']} ({results['head']} head, {results['weighting']} weighting) "
        f"seed {results['seed']}: "
        f"{results['steps']} steps in {results['train_wall_time_s']:.0f} s\n"
        f"[diffbench] final {metrics}\n"
        f"[diffbench] results in {results['run_dir']}/results.json (sample grids and curves beside it)"
    )
