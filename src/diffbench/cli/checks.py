"""Every setting a run could only trip over after training, checked when the config is composed:
each failure is one paragraph that names the key, the value and what to do, and nothing has
been trained or written yet."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from omegaconf import DictConfig

from diffbench.config import ConfigError
from diffbench.core.diffusion import SCHEDULES
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.data import DATAMODULES
from diffbench.evaluation.fidelity import INCEPTION_DATASETS, resolve_inception_weights
from diffbench.rundir import CONFIG, RunDir, config_differences, trial_dir
from diffbench.sampling.samplers import SAMPLERS
from diffbench.spec import RunSpec, build_spec

VARIANCES = ("small", "large")
PRECISIONS = tuple(dict.fromkeys(str(p) for group in get_args(_PRECISION_INPUT) for p in get_args(group)))


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_choices(cfg: DictConfig) -> None:
    """Names that select code: a typo must not silently fall back to a default."""
    head, weighting = cfg.objective.head, cfg.objective.weighting
    need(head in HEADS, f"head={head!r} is not a head; choose one of {', '.join(HEADS)} (e.g. head=eps).")
    need(
        weighting != "simple",
        "weighting=simple is now called weighting=own (the head's own unweighted MSE); "
        "the eps_simple, x0_simple and score_simple presets keep their names.",
    )
    need(
        weighting in WEIGHTINGS,
        f"weighting={weighting!r} is not a weighting; choose one of {', '.join(WEIGHTINGS)} "
        "(docs/math.md lists what each one weighs).",
    )
    need(
        cfg.diffusion.schedule in SCHEDULES,
        f"diffusion.schedule={cfg.diffusion.schedule!r} is not a noise schedule; choose one of "
        f"{', '.join(SCHEDULES)}.",
    )
    for key, value in (
        ("diffusion.variance", cfg.diffusion.variance),
        ("sample.variance", cfg.sample.variance),
    ):
        need(
            value in VARIANCES,
            f"{key}={value!r}: the reverse-process variance is 'small' (β̃_t, the posterior's) or "
            "'large' (β_t); nothing else is implemented.",
        )
    need(
        cfg.eval.sampler in SAMPLERS,
        f"eval.sampler={cfg.eval.sampler!r} is not a sampler; choose one of {', '.join(SAMPLERS)}.",
    )
    need(
        str(cfg.trainer.precision) in PRECISIONS,
        f"trainer.precision={cfg.trainer.precision!r} is not a Lightning precision; use one of "
        f"{', '.join(PRECISIONS)} (32-true on CPU, bf16-mixed on recent GPUs).",
    )


def check_sizes(cfg: DictConfig) -> None:
    """Counts and budgets: zero or negative values that would train nothing or divide by zero."""
    T, steps = cfg.diffusion.num_timesteps, cfg.trainer.max_steps
    need(positive_int(T) and T >= 2, f"diffusion.num_timesteps={T!r} must be an integer of at least 2.")
    need(
        positive_int(steps),
        f"trainer.max_steps={steps!r} must be a positive integer: a run with no training step would "
        "evaluate an untrained network as if it were a result.",
    )
    for key in ("batch_size", "eval_batch_size"):
        need(positive_int(cfg.data[key]), f"data.{key}={cfg.data[key]!r} must be a positive integer.")
    need(
        isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool) and cfg.seed >= 0,
        f"seed={cfg.seed!r} must be a non-negative integer (it seeds the split, initialisation and noise).",
    )
    need(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr!r} must be positive.")
    need(0 <= cfg.optim.ema_decay < 1, f"optim.ema_decay={cfg.optim.ema_decay!r} must be in [0, 1).")
    need(
        positive_int(cfg.run.checkpoint_every),
        f"run.checkpoint_every={cfg.run.checkpoint_every!r} must be a positive integer.",
    )
    interval = cfg.trainer.val_check_interval
    need(
        positive_int(interval),
        f"trainer.val_check_interval={interval!r} must be a positive integer (steps between validations).",
    )
    K = cfg.eval.vlb_timesteps
    need(
        not K or (positive_int(K) and 2 * K <= T and T % K == 0),
        f"eval.vlb_timesteps={K} must divide diffusion.num_timesteps={T} into strata of at least "
        "two steps (or be 0 for all T terms).",
    )
    need(
        isinstance(cfg.sample.num_images, int) and cfg.sample.num_images >= 0,
        f"sample.num_images={cfg.sample.num_images!r} must be 0 (no grid) or a positive integer.",
    )
    need(cfg.eval.budget_base >= 0, f"eval.budget_base={cfg.eval.budget_base!r} must be 0 or positive.")
    need(
        cfg.eval.budget_samples == 0 or cfg.eval.budget_samples >= 4,
        f"eval.budget_samples={cfg.eval.budget_samples!r} must be 0 (none) or at least 4.",
    )
    if cfg.eval.enabled:
        need(
            positive_int(cfg.eval.num_samples) and cfg.eval.num_samples >= 4,
            f"eval.num_samples={cfg.eval.num_samples!r}: the sample metrics need at least 4 samples "
            "(precision/recall use 3 nearest neighbours); or set eval.enabled=false.",
        )
        sampler = SAMPLERS[cfg.eval.sampler]
        need(
            sampler.valid_steps(cfg.eval.sampler_steps, T),
            f"eval.sampler_steps={cfg.eval.sampler_steps!r} must be between 1 and diffusion.num_timesteps={T}"
            f"{' (or 0 for all T steps)' if sampler.every_step else ''}.",
        )
        for spec in cfg.eval.also_samplers:
            check_sampler_spec(spec, T)


def check_sampler_spec(spec: object, T: int) -> None:
    """One entry of eval.also_samplers: `<sampler>-<steps>` with steps in 1..T, or `ancestral` for
    every step."""
    name, _, steps = str(spec).partition("-")
    sampler = SAMPLERS.get(name)
    valid = sampler is not None and (
        (steps.isdigit() and sampler.valid_steps(int(steps), T) and int(steps) > 0)
        or (not steps and sampler.every_step)
    )
    need(
        valid,
        f"eval.also_samplers has {spec!r}, which is not a sampler setting: write <sampler>-<steps> with "
        f"a sampler among {', '.join(SAMPLERS)} and steps between 1 and diffusion.num_timesteps={T} "
        "(e.g. eval.also_samplers=[ddim-10,ancestral-50]), or `ancestral` for all T steps.",
    )


def check_shapes(cfg: DictConfig) -> None:
    """The U-Net must fit the data: channels, size, and a size its downsampling divides."""
    module = DATAMODULES.get(cfg.data.name)
    if module is None:
        raise ConfigError(f"data={cfg.data.name!r} is not a dataset; choose one of {', '.join(DATAMODULES)}.")
    channels, size, _ = module.image_shape
    need(
        cfg.model.in_channels == channels,
        f"model.in_channels={cfg.model.in_channels} but data={cfg.data.name} has {channels} channel(s); "
        f"set model.in_channels={channels} or pick the model preset made for it.",
    )
    need(
        cfg.model.image_size == size,
        f"model.image_size={cfg.model.image_size} but data={cfg.data.name} images are {size}x{size}; "
        f"set model.image_size={size} or pick the model preset made for it.",
    )
    halvings = len(cfg.model.channel_mult) - 1
    need(
        size % 2**halvings == 0,
        f"model.channel_mult={list(cfg.model.channel_mult)} halves the image {halvings} time(s), "
        f"which {size}x{size} images do not allow; use fewer levels.",
    )


def check_run_dir(spec: RunSpec) -> None:
    """An explicit run directory must be a directory this user can write, and if it holds a run,
    a run of this very config: resuming another run's directory would overwrite its results."""
    if not spec.output.dir and not spec.output.reuse:
        return
    path = Path(spec.output.dir) if spec.output.dir else trial_dir(spec)
    need(
        not path.exists() or path.is_dir(), f"run.dir={path} is a file, not a directory; choose another path."
    )
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    need(
        os.access(parent, os.W_OK),
        f"run.dir={path}: {parent} is not writable; choose a folder you can write.",
    )
    stored = RunDir(path).read_config()
    differences = config_differences(stored, spec) if stored is not None else []
    more = len(differences) - 6
    shown = "; ".join(differences[:6]) + (f"; and {more} more" if more > 0 else "")
    need(
        not differences,
        f"run.dir={path} holds a run with other settings ({shown}). Continuing it would overwrite "
        f"that run's results with this one's. Choose a new run.dir, or repeat that run's settings "
        f"(its {CONFIG}) to resume it; nothing was written.",
    )


CHECKS: tuple[Callable[[DictConfig], None], ...] = (check_choices, check_sizes, check_shapes)


def check_settings(cfg: DictConfig) -> RunSpec:
    """Every check of the composed config, then the run spec built from it, its run directory, and
    the offline Inception weights a CIFAR-10 evaluation needs; the spec is what the run takes."""
    for check in CHECKS:
        check(cfg)
    spec = build_spec(cfg)
    check_run_dir(spec)
    if spec.evaluation.enabled and spec.data.name in INCEPTION_DATASETS:
        resolve_inception_weights(spec.evaluation.inception_weights)
    return spec
