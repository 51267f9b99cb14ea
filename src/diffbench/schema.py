"""What a valid setting is: every key of the composed config with its type and, where it has one,
its range, declared once in `SCHEMA`. The command line, presets, `diffbench.evaluate` overrides and
a run directory's stored config.yaml all pass through it; a broken rule is one paragraph naming the
key, the value, what it must be and an example. Rules that relate settings to each other or to this
machine are `rules.py`'s. The integer, number and choice checks below are the only ones."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
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
MIN_SAMPLES = 4
"""The fewest samples a sample metric takes: precision/recall use each image's 3 nearest neighbours."""


def is_int(value: object) -> bool:
    """An integer, and not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object, finite: bool = True) -> bool:
    """An int or a float, not a bool; with `finite`, neither NaN nor infinite."""
    return (is_int(value) or isinstance(value, float)) and (not finite or math.isfinite(value))


def is_text(value: object) -> bool:
    """What a text setting may be given as: YAML reads `name: 123` as a number, which is still a name."""
    return isinstance(value, str) or is_number(value, finite=False)


KINDS: dict[type, Callable[[object], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: is_int,
    float: lambda v: is_number(v, finite=False),
    str: is_text,
    list: lambda v: isinstance(v, list),
}
"""A value's type, checked before its range: `seed=abc` has the wrong type, `seed=-1` the wrong value."""


@dataclass(frozen=True)
class Field:
    """One setting: its type (None: any), a test of its value and, for the message, what the value
    must be and an example. `explain`, where given, says what is wrong with a broken value itself
    (a list whose items are checked one by one)."""

    kind: type | None
    valid: Callable[[Any], bool]
    must: str
    example: str
    explain: Callable[[Any], str] | None = None


def integer(low: int = 0, high: int | None = None) -> Field:
    bounds = f"at least {low}" if high is None else f"between {low} and {high}"
    return Field(
        int,
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

    return Field(float, valid, f"a finite number {span}", f"{(low + min(high, low + 2)) / 2:g}")


def choice(*options: object, kind: type | None = str) -> Field:
    return Field(kind, lambda v: v in options, f"one of {', '.join(map(str, options))}", str(options[0]))


def registered(registry: Mapping[str, object]) -> Field:
    """A name in a registry, read when checked: a head or weighting registered later (docs/extending.md)
    is valid at once."""
    return Field(str, lambda v: v in registry, f"one of {', '.join(registry)}", next(iter(registry)))


BOOL = Field(bool, lambda v: isinstance(v, bool), "true or false", "true")
TEXT = Field(str, lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string", "name")
WANDB_NAME = Field(
    str,
    lambda v: isinstance(v, str) and 0 < len(v) <= 128 and not any(c.isspace() or c in "/\\#?%:" for c in v),
    "a W&B name: 1 to 128 characters, no spaces and none of / \\ # ? % :",
    "diffbench",
)


def optional(field: Field) -> Field:
    """null or the field's value; its type is not asked first, so any other value hears what it must be."""
    return Field(None, lambda v: v is None or field.valid(v), f"null or {field.must}", "null")


def int_list(low: int = 1, empty: bool = False) -> Field:
    return Field(
        list,
        lambda v: isinstance(v, list) and (empty or v) and all(is_int(x) and x >= low for x in v),
        f"a list of integers of at least {low}" + ("" if empty else ", not empty"),
        "[1,2]",
    )


NAME_MAX = 255
"""The longest file or folder name common file systems hold."""


def path_text(optional_value: bool = False) -> Field:
    """A file-system path: written out, since `~` is not expanded by anything that reads it."""
    base = Field(
        str,
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


def sampler_setting(text: object) -> tuple[str, int] | None:
    """`ddim-10` → ("ddim", 10); a bare name (`ancestral`) of a sampler that runs every step → steps
    0; None when the text is not a sampler setting. The one reader of the `<sampler>-<steps>` form."""
    name, _, steps = str(text).partition("-")
    sampler = SAMPLERS.get(name)
    if sampler is None or not (steps.isdigit() or (not steps and sampler.every_step)):
        return None
    return name, int(steps) if steps else 0


def unreadable_sampler(value: list) -> str:
    """Which item of eval.also_samplers is not a sampler setting, and how to write one."""
    text = next(x for x in value if sampler_setting(x) is None)
    return (
        f"eval.also_samplers has {text!r}, which is not a sampler setting: write <sampler>-<steps> "
        f"with a sampler among {', '.join(SAMPLERS)} and steps from 1 to diffusion.num_timesteps "
        "(e.g. eval.also_samplers=[ddim-10,ancestral-50]), or `ancestral` for all T steps"
    )


SCHEMA: dict[str, Field] = {
    "experiment": TEXT,
    "profile": TEXT,
    "seed": integer(0, SEED_LIMIT - 1),
    "objective.name": TEXT,
    "objective.head": registered(HEADS),
    "objective.weighting": registered(WEIGHTINGS),
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
        list,
        lambda v: isinstance(v, list) and all(sampler_setting(x) is not None for x in v),
        "a list of <sampler>-<steps> strings",
        "[ddim-10]",
        unreadable_sampler,
    ),
    "eval.reference_split": choice(*SPLITS),
    "eval.inception_weights": path_text(optional_value=True),
    "eval.trajectory_images": integer(0, 10_000),
    "eval.trajectory_steps": integer(0),
    "eval.profile_timesteps": integer(1, 10_000),
    "eval.gmm_timesteps": integer(1, 10_000),
    "eval.budget_base": integer(0, STEP_LIMIT),
    "eval.budget_samples": Field(
        int,
        lambda v: is_int(v) and (v == 0 or MIN_SAMPLES <= v <= 10**6),
        f"0 (none) or an integer from {MIN_SAMPLES} to 1000000 (precision/recall need 3 neighbours)",
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
    "trainer.precision": Field(
        str, lambda v: str(v) in PRECISIONS, f"one of {', '.join(PRECISIONS)}", "32-true"
    ),
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
    "data.download": choice("auto", True, False, kind=None),
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
RENAMED = {"objective.weighting": ("simple", "own")}
"""Values an earlier diffbench wrote under another name (key: (old, new)): refused on the command
line, read under their new name from a stored config.yaml."""


def renamed(key: str, value: object) -> bool:
    return key in RENAMED and value == RENAMED[key][0]


def field_of(key: str) -> Field | None:
    """The rule of a dotted key, or None for a key diffbench does not read."""
    return MARGIN if key.startswith(FREE) else SCHEMA.get(key)


def flat_items(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted settings; a mapping is a group of settings unless the schema names it a setting
    (then it is a value of the wrong type)."""
    items = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if (
            isinstance(value, dict)
            and dotted not in SCHEMA
            and (not dotted.startswith(FREE) or dotted == "report.margins")
        ):
            items += flat_items(value, dotted + ".")
        else:
            items.append((dotted, value))
    return items


def fault(key: str, value: object, field: Field) -> str | None:
    """What is wrong with one value, its type first, as the rest of a sentence that begins
    `key=value`; None when the value is valid. The one place a value is judged."""
    if field.kind is not None and value is not None and not KINDS[field.kind](value):
        return (
            f"has the wrong type: {key} expects a {field.kind.__name__} (e.g. {key}={field.example}), "
            f"got a {type(value).__name__}"
        )
    if field.valid(value):
        return None
    said = (
        field.explain(value) if field.explain else f"{key} must be {field.must} (e.g. {key}={field.example})"
    )
    return f"is not valid: {said}"


def origin(resolved: dict[str, Any], key: str, value: object) -> str:
    """' in preset NAME' when the experiment preset sets this value, so a user who typed nothing
    wrong is sent to the file that did."""
    name = resolved.get("experiment")
    return f" in preset {name}" if isinstance(name, str) and (key, value) in preset_settings(name) else ""


def validate(resolved: dict[str, Any]) -> None:
    """Every setting against its rule; the first broken one is the error."""
    for key, value in flat_items(resolved):
        field = field_of(key)
        if field is None:
            raise ConfigError(
                f"{key}={value!r} is not a setting diffbench reads; remove it (README's 'Configuration' "
                "section lists the knobs)."
            )
        if renamed(key, value):
            raise ConfigError(
                "weighting=simple is now called weighting=own (the head's own unweighted MSE); "
                "the eps_simple, x0_simple and score_simple presets keep their names."
            )
        problem = fault(key, value, field)
        if problem is not None:
            where = origin(resolved, key, value)
            raise ConfigError(f"{key}={value!r}{where} {problem}; nothing was trained or written.")


def is_group(key: str) -> bool:
    """Whether a dotted key names a group of settings (`optim`), not a setting."""
    return any(name.startswith(f"{key}.") for name in (*SCHEMA, *FREE))


def stored_problem(config: dict[str, Any]) -> str | None:
    """Why a stored config.yaml cannot be read back, or None: the first setting this version reads
    whose value has the wrong type or is out of range, or a group of settings stored as one value.
    Keys it does not read are passed over (a newer or older diffbench wrote them)."""
    for key, value in flat_items(config):
        field = field_of(key)
        if field is None and is_group(key):
            return f"{key}={value!r} has the wrong type: {key} is a group of settings, not one value"
        if field is None or renamed(key, value):
            continue
        problem = fault(key, value, field)
        if problem is not None:
            return f"{key}={value!r} {problem}"
    return None


def current_names(config: dict[str, Any]) -> dict[str, Any]:
    """A stored config with every renamed value under its new name (`weighting: simple` → `own`)."""
    out = dict(config)
    for key, (old, new) in RENAMED.items():
        group, _, name = key.rpartition(".")
        section = out.get(group)
        if isinstance(section, dict) and section.get(name) == old:
            out[group] = {**section, name: new}
    return out
