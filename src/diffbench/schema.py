"""What a valid setting is: every key of the composed config with its type and, where it has one,
its range. The command line, presets and `diffbench.evaluate` overrides all pass through it before
anything is trained or written; a broken rule is one paragraph naming the key, the value, what it
must be and an example. Rules that relate two settings are `cli/checks.py`'s."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

from diffbench.config import ConfigError, preset_settings
from diffbench.core.diffusion import SCHEDULES
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.data import DATAMODULES
from diffbench.sampling.samplers import SAMPLERS

PRECISIONS = tuple(dict.fromkeys(str(p) for group in get_args(_PRECISION_INPUT) for p in get_args(group)))
VARIANCES = ("small", "large")
SPLITS = ("train", "val", "test")
SEED_LIMIT = 2**32
"""Seeds are non-negative and below 2³², the range every seeded library here accepts."""
STEP_LIMIT = 10**8
"""More training steps than any run could take: a larger number is a typo, not a budget."""


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Field:
    """One setting: a test of its value and, for the message, what the value must be."""

    valid: Callable[[Any], bool]
    must: str
    example: str


def integer(low: int = 0, high: int | None = None) -> Field:
    bounds = f"at least {low}" if high is None else f"between {low} and {high}"
    return Field(
        lambda v: is_int(v) and v >= low and (high is None or v <= high),
        f"an integer {bounds}",
        str(max(low, 1)),
    )


def number(
    low: float = 0.0, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> Field:
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    span = (
        f"in {left}{low:g}, {high:g}{right}"
        if math.isfinite(high)
        else f"{'above' if low_open else 'at least'} {low:g}"
    )

    def valid(v: object) -> bool:
        if not is_number(v):
            return False
        above = v > low if low_open else v >= low
        below = v < high if high_open else v <= high
        return above and below

    return Field(valid, f"a finite number {span}", f"{(low + min(high, low + 2)) / 2:g}")


def choice(*options: object) -> Field:
    return Field(lambda v: v in options, f"one of {', '.join(map(str, options))}", str(options[0]))


BOOL = Field(lambda v: isinstance(v, bool), "true or false", "true")
TEXT = Field(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string", "name")
WANDB_NAME = Field(
    lambda v: isinstance(v, str) and 0 < len(v) <= 128 and not any(c.isspace() or c in "/\\#?%:" for c in v),
    "a W&B name: 1 to 128 characters, no spaces and none of / \\ # ? % :",
    "diffbench",
)


def optional(field: Field) -> Field:
    return Field(lambda v: v is None or field.valid(v), f"null or {field.must}", "null")


def int_list(low: int = 1, empty: bool = False) -> Field:
    return Field(
        lambda v: isinstance(v, list) and (empty or v) and all(is_int(x) and x >= low for x in v),
        f"a list of integers of at least {low}" + ("" if empty else ", not empty"),
        "[1,2]",
    )


NAME_MAX = 255
"""The longest file or folder name common file systems hold."""


def path_text(optional_value: bool = False) -> Field:
    """A file-system path: written out, since `~` is not expanded by anything that reads it."""
    base = Field(
        lambda v: (
            isinstance(v, str)
            and v.strip() != ""
            and not v.startswith("~")
            and "\0" not in v
            and all(len(part.encode()) <= NAME_MAX for part in v.split("/"))
        ),
        f"a path (without a leading ~: write $HOME's full path; no name in it over {NAME_MAX} bytes)",
        "runs",
    )
    return optional(base) if optional_value else base


SCHEMA: dict[str, Field] = {
    "experiment": TEXT,
    "profile": TEXT,
    "seed": integer(0, SEED_LIMIT - 1),
    "objective.name": TEXT,
    "objective.head": choice(*HEADS),
    "objective.weighting": choice(*WEIGHTINGS),
    "diffusion.schedule": choice(*SCHEDULES),
    "diffusion.num_timesteps": integer(2, 100_000),
    "diffusion.variance": choice(*VARIANCES),
    "optim.lr": number(0.0, low_open=True),
    "optim.weight_decay": number(0.0, 10.0),
    "optim.warmup_steps": integer(0, STEP_LIMIT),
    "optim.ema_decay": number(0.0, 1.0, high_open=True),
    "sample.num_images": integer(0, 10_000),
    "sample.variance": choice(*VARIANCES),
    "eval.enabled": BOOL,
    "eval.split": choice(*SPLITS),
    "eval.num_images": integer(0),
    "eval.vlb_timesteps": integer(0),
    "eval.vlb_batch_timesteps": integer(1, 100_000),
    "eval.ode_images": integer(0),
    "eval.ode_method": choice("dopri5", "heun"),
    "eval.ode_rtol": number(0.0, 1.0, low_open=True, high_open=True),
    "eval.ode_atol": number(0.0, 1.0, low_open=True, high_open=True),
    "eval.num_samples": integer(1, 10**6),
    "eval.sample_batch_size": integer(1, 10**5),
    "eval.sampler": choice(*SAMPLERS),
    "eval.sampler_steps": integer(0),
    "eval.ddim_eta": number(0.0, 1.0),
    "eval.also_samplers": Field(
        lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "a list of <sampler>-<steps> strings",
        "[ddim-10]",
    ),
    "eval.reference_split": choice(*SPLITS),
    "eval.inception_weights": path_text(optional_value=True),
    "eval.trajectory_images": integer(0, 10_000),
    "eval.trajectory_steps": integer(0),
    "eval.profile_timesteps": integer(1, 10_000),
    "eval.gmm_timesteps": integer(1, 10_000),
    "eval.budget_base": integer(0, STEP_LIMIT),
    "eval.budget_samples": Field(
        lambda v: is_int(v) and (v == 0 or 4 <= v <= 10**6),
        "0 (none) or an integer from 4 to 1000000 (precision/recall need 3 neighbours)",
        "256",
    ),
    "eval.budget_sampler_steps": integer(1),
    "speed.compile": BOOL,
    "speed.channels_last": BOOL,
    "speed.fused_adamw": BOOL,
    "speed.threads": integer(0, 4096),
    "run.root": path_text(),
    "run.dir": path_text(optional_value=True),
    "run.reuse": BOOL,
    "run.checkpoint_every": integer(1, STEP_LIMIT),
    "wandb.project": WANDB_NAME,
    "wandb.entity": optional(WANDB_NAME),
    "wandb.mode": choice("auto", "online", "offline", "disabled"),
    "trainer.name": TEXT,
    "trainer.accelerator": choice("auto", "cpu", "gpu", "cuda"),
    "trainer.devices": integer(1, 4096),
    "trainer.num_nodes": integer(1, 100_000),
    "trainer.strategy": choice("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "fsdp"),
    "trainer.precision": Field(lambda v: str(v) in PRECISIONS, f"one of {', '.join(PRECISIONS)}", "32-true"),
    "trainer.gradient_clip_val": optional(number(0.0, low_open=True)),
    "trainer.val_check_interval": integer(1, STEP_LIMIT),
    "trainer.log_every_n_steps": integer(1, STEP_LIMIT),
    "trainer.max_steps": integer(1, STEP_LIMIT),
    "model.name": TEXT,
    "model.in_channels": integer(1, 64),
    "model.image_size": integer(1, 4096),
    "model.base_channels": integer(1, 4096),
    "model.channel_mult": int_list(1),
    "model.num_res_blocks": integer(1, 64),
    "model.attention_resolutions": int_list(1, empty=True),
    "model.dropout": number(0.0, 1.0, high_open=True),
    "model.num_heads": integer(1, 1024),
    "model.norm_groups": integer(1, 4096),
    "data.name": choice(*DATAMODULES),
    "data.split_seed": integer(0, SEED_LIMIT - 1),
    "data.batch_size": integer(1, 10**5),
    "data.eval_batch_size": integer(1, 10**6),
    "data.num_workers": integer(0, 256),
    "data.val_fraction": number(0.0, 1.0, low_open=True, high_open=True),
    "data.test_fraction": number(0.0, 1.0, low_open=True, high_open=True),
    "data.root": path_text(),
    "data.download": Field(lambda v: v in ("auto", True, False), "auto, true or false", "auto"),
    "data.num_components": integer(1, 10_000),
    "data.covariance_type": choice("full", "tied", "diag", "spherical"),
    "data.reg_covar": number(0.0, 100.0, low_open=True),
    "data.num_train": integer(1, 10**7),
    "data.num_val": integer(1, 10**7),
    "data.num_test": integer(1, 10**7),
    "data.fit_seed": integer(0, SEED_LIMIT - 1),
    "data.fresh_samples": BOOL,
}
FREE = ("report.margins.",)
"""Keys under these prefixes are named by the user (a margin per metric); only their values are checked."""
MARGIN = number(0.0, low_open=True)


def flat_items(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and not dotted.startswith(FREE) or dotted == "report.margins":
            items += flat_items(value, dotted + ".")
        else:
            items.append((dotted, value))
    return items


def origin(resolved: dict[str, Any], key: str, value: object) -> str:
    """' in preset NAME' when the experiment preset sets this value, so a user who typed nothing
    wrong is sent to the file that did."""
    name = resolved.get("experiment")
    return f" in preset {name}" if name and (key, value) in preset_settings(name) else ""


def validate(resolved: dict[str, Any]) -> None:
    """Every setting against its rule; the first broken one is the error."""
    for key, value in flat_items(resolved):
        field = MARGIN if key.startswith(FREE) else SCHEMA.get(key)
        if field is None:
            raise ConfigError(
                f"{key}={value!r} is not a setting diffbench reads; remove it (README's 'Configuration' "
                "section lists the knobs)."
            )
        if key == "objective.weighting" and value == "simple":
            raise ConfigError(
                "weighting=simple is now called weighting=own (the head's own unweighted MSE); "
                "the eps_simple, x0_simple and score_simple presets keep their names."
            )
        if not field.valid(value):
            raise ConfigError(
                f"{key}={value!r}{origin(resolved, key, value)} is not valid: {key} must be {field.must} "
                f"(e.g. {key}={field.example}); nothing was trained or written."
            )
