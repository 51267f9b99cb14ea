"""`python -m diffbench.run experiment=eps_simple [key=value …]`: train one arm, draw a sample
grid, and leave a run directory with config, checkpoints, metrics CSV and results.json."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
import wandb
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from diffbench.config import ConfigError, compose, config_hash, trial_dir
from diffbench.data import build_datamodule
from diffbench.data.base import ArrayDataModule
from diffbench.data.vision import DatasetMissingError
from diffbench.evaluate import evaluate, save_grid
from diffbench.fidelity import INCEPTION_DATASETS, InceptionWeightsMissingError, resolve_inception_weights
from diffbench.module import MODULES, DiffusionModule
from diffbench.samplers import ddpm_ancestral
from diffbench.tracking import quiet_wandb_environment, wandb_mode
from diffbench.unet import UNet, count_parameters

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
MODULE_SWITCHES = ("name", "checkpoint_every", "compile", "channels_last")
RUN_DIR_ENV = "DIFFBENCH_RUN_DIR"


def write_json_atomic(path: Path, data: dict) -> None:
    """Write to a temporary sibling and rename, so readers never see half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def make_run_dir(cfg: DictConfig) -> Path:
    """A fresh `<root>/<experiment>/<timestamp>_s<seed>` (suffixed when the second is taken), or
    `run.dir`; DDP workers inherit their launcher's choice through the environment."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if cfg.run.dir or cfg.run.reuse:
        run_dir = Path(cfg.run.dir) if cfg.run.dir else trial_dir(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        parent = Path(cfg.run.root) / cfg.experiment
        parent.mkdir(parents=True, exist_ok=True)
        stem = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_s{cfg.seed}"
        for attempt in range(1, 1000):
            run_dir = parent / (stem if attempt == 1 else f"{stem}_{attempt}")
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    return run_dir.resolve()


def completed_results(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The results of a finished run of this very config in `run_dir`, if there are any."""
    path = run_dir / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if results.get("status") == "complete" and results.get("config_hash") == config_hash(cfg):
        return results
    return None


def latest_checkpoint(folder: Path) -> Path | None:
    """last.ckpt, or the highest-step checkpoint when the run died before writing last.ckpt."""
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    steps = sorted(folder.glob("step*.ckpt"))
    return steps[-1] if steps else None


def build_module(cfg: DictConfig, datamodule: ArrayDataModule) -> DiffusionModule:
    model_args = {k: v for k, v in cfg.model.items() if k != "name"}
    net = UNet(**OmegaConf.to_container(OmegaConf.create(model_args)))
    return MODULES[cfg.objective.head](
        net,
        weighting=cfg.objective.weighting,
        schedule=cfg.diffusion.schedule,
        num_timesteps=cfg.diffusion.num_timesteps,
        variance=cfg.diffusion.variance,
        num_levels=datamodule.num_levels,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps,
        ema_decay=cfg.optim.ema_decay,
        channels_last=cfg.trainer.channels_last,
        compile=cfg.trainer.compile,
    )


class FlushCSVOnCheckpoint(Callback):
    """Write buffered CSV rows whenever a checkpoint is taken, so a run resumed after a crash
    keeps the metrics logged before it."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()


def keep_previous_metrics(csv_logger: CSVLogger, resume_step: int) -> None:
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; on resume, set the
    file aside while the writer starts, give it the old columns, and put back the rows logged
    before the checkpoint (rows after it were flushed by a later checkpoint that the crash cut
    short, and will be logged again)."""
    path = Path(csv_logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    kept = path.with_name("metrics.csv.resume")
    os.replace(path, kept)
    with kept.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = (rows[0], rows[1:]) if rows else ([], [])
    step = header.index("step") if "step" in header else None
    before = [row for row in body if step is None or not row[step] or int(float(row[step])) < resume_step]
    csv_logger.experiment.metrics_keys = header
    with kept.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *before] if header else [])
    os.replace(kept, path)


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    quiet_wandb_environment()
    mode = wandb_mode(cfg.wandb.mode)
    wandb_logger = WandbLogger(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        save_dir=str(run_dir),
        name=f"{cfg.experiment}-s{cfg.seed}-{run_dir.name}",
        group=cfg.experiment,
        job_type="train",
        tags=[cfg.objective.head, cfg.objective.weighting, cfg.data.name],
        mode=mode,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    csv_logger = CSVLogger(save_dir=str(run_dir), name="", version="")
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="step{step:07d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.trainer.checkpoint_every,
        save_last=True,
        save_top_k=-1,
    )
    trainer_args = {k: v for k, v in cfg.trainer.items() if k not in MODULE_SWITCHES}
    return L.Trainer(
        **OmegaConf.to_container(OmegaConf.create(trainer_args)),
        check_val_every_n_epoch=None,
        default_root_dir=str(run_dir),
        logger=[wandb_logger, csv_logger],
        callbacks=[FlushCSVOnCheckpoint(), checkpoint, LearningRateMonitor(logging_interval="step")],
    )


def draw_samples(cfg: DictConfig, module: DiffusionModule, path: Path, shape: tuple[int, ...]) -> dict:
    """A grid from the EMA model with DDPM's plain ancestral sampler over all T steps."""
    generator = torch.Generator(device=module.device).manual_seed(cfg.seed)
    start = time.perf_counter()
    samples = ddpm_ancestral(
        module.eps_hat,
        module.schedule,
        (cfg.sample.num_images, *shape),
        generator,
        variance=cfg.sample.variance,
        progress=True,
    )
    save_grid(samples, path, nrow=math.ceil(cfg.sample.num_images**0.5))
    return {
        "file": path.name,
        "sampler": "ancestral",
        "steps": module.num_timesteps,
        "num_images": cfg.sample.num_images,
        "variance": cfg.sample.variance,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }


def train(cfg: DictConfig) -> dict:
    """Fit one arm, evaluate it, and return what `results.json` records (rank zero)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(OmegaConf.merge(cfg.data, {"seed": cfg.seed}))
    datamodule.setup()
    run_dir = make_run_dir(cfg)
    done = completed_results(run_dir, cfg)
    if done:
        print(f"[diffbench] {cfg.experiment} seed {cfg.seed}: already complete in {run_dir}; skipping")
        return done
    datamodule.train_samples = cfg.trainer.max_steps * cfg.data.batch_size
    module = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, run_dir)
    num_params = count_parameters(module.net)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml")
        print(f"[diffbench] {cfg.experiment}: U-Net with {num_params:,} parameters; run directory {run_dir}")
    last = latest_checkpoint(run_dir / "checkpoints")
    if last and trainer.is_global_zero:
        print(f"[diffbench] resuming the interrupted run from {last}")
        resume_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
        keep_previous_metrics(trainer.loggers[1], resume_step)
    for logger in trainer.loggers:
        logger.log_hyperparams({"num_params": num_params})
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last else None)
    train_seconds = time.perf_counter() - start
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    module.to(trainer.strategy.root_device)
    evaluation = evaluate(module, datamodule, cfg, run_dir) if cfg.eval.enabled else {}
    if not trainer.is_global_zero:
        return {}
    shape = datamodule.image_shape
    grid = draw_samples(cfg, module, run_dir / "samples.png", shape) if cfg.sample.num_images else None
    results = {
        "status": "complete",
        "experiment": cfg.experiment,
        "profile": cfg.profile,
        "config_hash": config_hash(cfg),
        "head": cfg.objective.head,
        "weighting": cfg.objective.weighting,
        "seed": cfg.seed,
        "data": cfg.data.name,
        "model": cfg.model.name,
        "num_params": num_params,
        "steps": trainer.global_step,
        "train_wall_time_s": round(train_seconds, 2),
        "metrics": {**{key: float(value) for key, value in final.items()}, **scalars(evaluation)},
        "evaluation": settings(evaluation),
        "samples": grid,
        "run_dir": str(run_dir),
    }
    log_to_wandb(trainer.loggers[0], results, run_dir, trainer.global_step)
    write_json_atomic(run_dir / "results.json", results)
    trainer.loggers[0].experiment.finish()
    print_summary(results)
    return results


def scalars(evaluation: dict) -> dict[str, float]:
    return {k: float(v) for k, v in evaluation.items() if isinstance(v, (int, float))}


def settings(evaluation: dict) -> dict[str, dict]:
    return {k: v for k, v in evaluation.items() if isinstance(v, dict)}


IMAGES = (
    "samples.png",
    "samples_ancestral.png",
    "samples_ddim.png",
    "samples_sde.png",
    "samples_ode.png",
    "x0_trajectory.png",
    "vlb_terms.png",
    "eps_star_distance.png",
)


CURVES = ("vlb_terms.csv", "eps_mse_by_t.csv", "eps_star_distance.csv")


def log_to_wandb(logger: WandbLogger, results: dict, run_dir: Path, step: int) -> None:
    """Final metrics as the run's summary (what W&B's runs table and grouping by `experiment`
    aggregate), the per-t curves as tables and the images."""
    run = logger.experiment
    for key in results["metrics"]:
        run.define_metric(f"final/{key}", summary="last")
    run.summary.update({f"final/{k}": v for k, v in results["metrics"].items()})
    run.summary.update({"seed": results["seed"], "num_params": results["num_params"]})
    for name in CURVES:
        if (run_dir / name).is_file():
            with (run_dir / name).open(newline="") as handle:
                header, *rows = list(csv.reader(handle))
            table = wandb.Table(columns=header, data=[[float(v) for v in row] for row in rows])
            run.log({f"curves/{Path(name).stem}": table})
    for name in IMAGES:
        if (run_dir / name).is_file():
            logger.log_image(key=f"eval/{Path(name).stem}", images=[str(run_dir / name)], step=step)


def print_summary(results: dict) -> None:
    metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(results["metrics"].items()))
    print(
        f"\n[diffbench] {results['experiment']} ({results['head']}, {results['weighting']}) "
        f"seed {results['seed']}: "
        f"{results['steps']} steps in {results['train_wall_time_s']:.0f} s\n"
        f"[diffbench] final {metrics}\n"
        f"[diffbench] results in {results['run_dir']}/results.json (sample grids and curves beside it)"
    )


def check_settings(cfg: DictConfig) -> None:
    """Catch settings that would only fail after training."""
    T, K = cfg.diffusion.num_timesteps, cfg.eval.vlb_timesteps
    if K and (2 * K > T or T % K):
        raise ConfigError(
            f"eval.vlb_timesteps={K} must divide diffusion.num_timesteps={T} into strata of at least "
            "two steps (or be 0 for all T terms)."
        )
    if cfg.objective.head not in MODULES:
        raise ConfigError(f"objective.head={cfg.objective.head!r}; choose one of {', '.join(MODULES)}.")
    if cfg.objective.weighting not in ("simple", "elbo"):
        raise ConfigError(f"objective.weighting={cfg.objective.weighting!r}; choose simple or elbo.")
    if cfg.eval.enabled and cfg.data.name in INCEPTION_DATASETS:
        resolve_inception_weights(cfg.eval.inception_weights)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose(args)
        check_settings(cfg)
        train(cfg)
    except (ConfigError, DatasetMissingError, InceptionWeightsMissingError) as error:
        print(f"diffbench.run: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
