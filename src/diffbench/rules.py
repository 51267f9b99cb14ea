"""The rules a run's settings keep beyond each key's own type and range (those are `schema.SCHEMA`'s):
rules between settings, and what this machine must offer (a GPU, folders it can write, a run
directory that holds this very run or none). Each failure is one paragraph, a ConfigError, that
names the keys, the values and what to do; nothing has been trained or written yet. The commands
turn it into a message and exit code 2."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from diffbench.atomic import unwritable_reason, writable_folder
from diffbench.config import ConfigError
from diffbench.data import DATAMODULES
from diffbench.rundir import CONFIG, RunDir, config_differences, trial_dir
from diffbench.sampling.samplers import SAMPLERS
from diffbench.schema import MIN_SAMPLES
from diffbench.spec import ConfigTree, RunSpec, build_spec

Rule = Callable[[RunSpec], None]


def need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_budgets(spec: RunSpec) -> None:
    """Counts that depend on the schedule's length or on whether there is an evaluation."""
    T, ev = spec.diffusion.num_timesteps, spec.evaluation
    K = ev.vlb_timesteps
    need(
        not K or (2 * K <= T and T % K == 0),
        f"eval.vlb_timesteps={K} must divide diffusion.num_timesteps={T} into strata of at least "
        "two steps (or be 0 for all T terms).",
    )
    if not ev.enabled:
        return
    need(
        ev.num_samples >= MIN_SAMPLES,
        f"eval.num_samples={ev.num_samples!r}: the sample metrics need at least {MIN_SAMPLES} samples "
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
    channels, size, _ = DATAMODULES[spec.data.name].image_shape
    model, name = spec.model, spec.data.name
    need(
        model.in_channels == channels,
        f"model.in_channels={model.in_channels} but data={name} has {channels} channel(s); "
        f"set model.in_channels={channels} or pick the model preset made for it.",
    )
    need(
        model.image_size == size,
        f"model.image_size={model.image_size} but data={name} images are {size}x{size}; "
        f"set model.image_size={size} or pick the model preset made for it.",
    )
    halvings = len(model.channel_mult) - 1
    need(
        size % 2**halvings == 0,
        f"model.channel_mult={list(model.channel_mult)} halves the image {halvings} time(s), "
        f"which {size}x{size} images do not allow; use fewer levels.",
    )


def check_model(spec: RunSpec) -> None:
    """The U-Net's widths must split into its GroupNorm groups and attention heads."""
    model = spec.model
    for mult in model.channel_mult:
        channels = model.base_channels * mult
        groups = min(model.norm_groups, channels)
        need(
            channels % groups == 0,
            f"model.base_channels={model.base_channels} × channel_mult {mult} = {channels} channels do "
            f"not split into model.norm_groups={model.norm_groups} groups; choose widths the groups "
            "divide.",
        )
        need(
            channels % model.num_heads == 0 or not model.attention_resolutions,
            f"model.num_heads={model.num_heads} does not divide {channels} channels of an attention "
            "level; choose a divisor (num_heads=1 always works).",
        )


def check_data(spec: RunSpec) -> None:
    """Splits that leave training images, and batches no larger than the training split."""
    options, name = spec.data.options, spec.data.name
    held_out = options.get("val_fraction", 0.0) + options.get("test_fraction", 0.0)
    need(
        held_out < 1,
        f"data.val_fraction + data.test_fraction = {held_out:g} leaves no training images; keep the sum "
        "below 1.",
    )
    if name == "digits":
        train = int(1797 * (1 - held_out))
    elif name == "gmm" and not options.get("fresh_samples", True):
        train = options.get("num_train", 0)
    else:
        return
    need(
        spec.data.batch_size <= train,
        f"data.batch_size={spec.data.batch_size} is larger than the {train} training images of data={name}; "
        "a batch would repeat images within itself. Use at most that many.",
    )


def check_hardware(spec: RunSpec) -> None:
    """GPU settings need a GPU: refused on a machine without one, with the CPU setting to use."""
    trainer = spec.trainer
    if not trainer.wants_gpu and not str(trainer.precision).startswith("16"):
        return
    import torch

    if torch.cuda.is_available():
        return
    if trainer.wants_gpu:
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator} asks for a GPU and this machine has none; drop "
            "trainer=gpu (or set trainer.accelerator=cpu) to train on the CPU, or run on a machine with CUDA."
        )
    raise ConfigError(
        f"trainer.precision={trainer.precision} is GPU half precision; on the CPU Lightning would run "
        "bf16 instead without saying so. Use trainer.precision=32-true (or bf16-mixed) on the CPU."
    )


def check_output(spec: RunSpec) -> None:
    """run.root must be a folder this user can create or write in."""
    root = Path(spec.output.root)
    need(not root.exists() or root.is_dir(), f"run.root={root} is a file, not a folder; choose another path.")
    need(
        writable_folder(root),
        f"run.root={root}: {unwritable_reason(root)}; choose a folder you can write (run.root=…).",
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
    need(
        writable_folder(path),
        f"run.dir={path}: {unwritable_reason(path)}; choose a folder you can write.",
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


BETWEEN: tuple[Rule, ...] = (check_budgets, check_shapes, check_model, check_data)
"""Rules between settings: they hold or fail wherever the run is started."""
MACHINE: tuple[Rule, ...] = (check_hardware, check_output, check_run_dir)
"""What the machine that checks must offer; `check_hardware` only when the run will run here."""
EVALUATION: tuple[Rule, ...] = (check_budgets,)
"""The rules `diffbench.evaluate` applies to a finished run's settings with its overrides."""


def check_spec(spec: RunSpec, here: bool = True) -> None:
    """Every rule between settings and every machine rule (the hardware only `here`)."""
    for rule in (*BETWEEN, *MACHINE):
        if here or rule is not check_hardware:
            rule(spec)


def check_settings(cfg: ConfigTree, here: bool = True) -> RunSpec:
    """The run spec of the composed config (every single setting checked as it is built), then the
    rules between settings, the folders and the run directory; the spec is what the run takes.
    With `here` false (trials a cluster will run) this machine's hardware is not asked about."""
    spec = build_spec(cfg)
    check_spec(spec, here)
    return spec


def check_evaluation(spec: RunSpec) -> None:
    """A finished run's spec with `diffbench.evaluate`'s overrides: the evaluation's counts."""
    for rule in EVALUATION:
        rule(spec)
