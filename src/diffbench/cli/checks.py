"""The rules between settings a run could only trip over after training (single settings are
checked as the spec is built, `spec.RULES`): each failure is one paragraph that names the keys,
the values and what to do, and nothing has been trained or written yet."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from diffbench.config import ConfigError
from diffbench.data import DATAMODULES
from diffbench.evaluation.fidelity import INCEPTION_DATASETS, resolve_inception_weights
from diffbench.rundir import CONFIG, RunDir, config_differences, trial_dir
from diffbench.sampling.samplers import SAMPLERS
from diffbench.spec import RunSpec, build_spec, positive_int


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_budgets(spec: RunSpec) -> None:
    """Counts that depend on the schedule's length or on whether there is an evaluation."""
    T, ev = spec.diffusion.num_timesteps, spec.evaluation
    K = ev.vlb_timesteps
    need(
        not K or (positive_int(K) and 2 * K <= T and T % K == 0),
        f"eval.vlb_timesteps={K} must divide diffusion.num_timesteps={T} into strata of at least "
        "two steps (or be 0 for all T terms).",
    )
    if not ev.enabled:
        return
    need(
        positive_int(ev.num_samples) and ev.num_samples >= 4,
        f"eval.num_samples={ev.num_samples!r}: the sample metrics need at least 4 samples "
        "(precision/recall use 3 nearest neighbours); or set eval.enabled=false.",
    )
    sampler = SAMPLERS[ev.sampler.name]
    need(
        sampler.valid_steps(ev.sampler.steps, T),
        f"eval.sampler_steps={ev.sampler.steps!r} must be between 1 and diffusion.num_timesteps={T}"
        f"{' (or 0 for all T steps)' if sampler.every_step else ''}.",
    )
    for also in ev.also_samplers:
        need(
            SAMPLERS[also.name].valid_steps(also.steps, T),
            f"eval.also_samplers has '{also.name}-{also.steps}': its steps must be between 1 and "
            f"diffusion.num_timesteps={T}; nothing was written.",
        )


def check_shapes(spec: RunSpec) -> None:
    """The U-Net must fit the data: channels, size, and a size its downsampling divides."""
    module = DATAMODULES.get(spec.data.name)
    if module is None:
        raise ConfigError(
            f"data={spec.data.name!r} is not a dataset; choose one of {', '.join(DATAMODULES)}."
        )
    channels, size, _ = module.image_shape
    model, name = spec.model, spec.data.name
    need(
        model["in_channels"] == channels,
        f"model.in_channels={model['in_channels']} but data={name} has {channels} channel(s); "
        f"set model.in_channels={channels} or pick the model preset made for it.",
    )
    need(
        model["image_size"] == size,
        f"model.image_size={model['image_size']} but data={name} images are {size}x{size}; "
        f"set model.image_size={size} or pick the model preset made for it.",
    )
    halvings = len(model["channel_mult"]) - 1
    need(
        size % 2**halvings == 0,
        f"model.channel_mult={list(model['channel_mult'])} halves the image {halvings} time(s), "
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


CHECKS: tuple[Callable[[RunSpec], None], ...] = (check_budgets, check_shapes, check_run_dir)


def check_settings(cfg: DictConfig) -> RunSpec:
    """The run spec of the composed config (every single setting checked as it is built), then the
    rules between settings, the run directory, and the offline Inception weights a CIFAR-10
    evaluation needs; the spec is what the run takes."""
    spec = build_spec(cfg)
    for check in CHECKS:
        check(spec)
    if spec.evaluation.enabled and spec.data.name in INCEPTION_DATASETS:
        resolve_inception_weights(spec.evaluation.inception_weights)
    return spec
