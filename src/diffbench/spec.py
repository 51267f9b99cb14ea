"""The run spec: the resolved config turned, once, into typed and frozen settings. Everything past
this builder — training, evaluation, the run directory, the commands — takes these values, never a
config tree, so a setting is read in one place and a reader can follow it by its type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, get_args

from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from omegaconf import DictConfig, OmegaConf

from diffbench.config import ConfigError
from diffbench.core.arms import Arm
from diffbench.core.diffusion import SCHEDULES, VarianceType
from diffbench.core.heads import HEADS
from diffbench.core.weightings import WEIGHTINGS
from diffbench.sampling.samplers import SAMPLERS
from diffbench.seeding import Streams

VARIANCES = ("small", "large")
PRECISIONS = tuple(dict.fromkeys(str(p) for group in get_args(_PRECISION_INPUT) for p in get_args(group)))


def integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: object) -> bool:
    return integer(value) and value > 0  # type: ignore[operator]


def count(value: object) -> bool:
    """0 or a positive integer."""
    return integer(value) and value >= 0  # type: ignore[operator]


Rule = tuple[str, Callable[[Any], bool], str]
RULES: tuple[Rule, ...] = (
    (
        "objective.head",
        HEADS.__contains__,
        f"head={{value!r}} is not a head; choose one of {', '.join(HEADS)} (e.g. head=eps).",
    ),
    (
        "objective.weighting",
        lambda w: w != "simple",
        "weighting=simple is now called weighting=own (the head's own unweighted MSE); "
        "the eps_simple, x0_simple and score_simple presets keep their names.",
    ),
    (
        "objective.weighting",
        WEIGHTINGS.__contains__,
        f"weighting={{value!r}} is not a weighting; choose one of {', '.join(WEIGHTINGS)} "
        "(docs/math.md lists what each one weighs).",
    ),
    (
        "diffusion.schedule",
        SCHEDULES.__contains__,
        f"diffusion.schedule={{value!r}} is not a noise schedule; choose one of {', '.join(SCHEDULES)}.",
    ),
    *(
        (
            key,
            VARIANCES.__contains__,
            f"{key}={{value!r}}: the reverse-process variance is 'small' (β̃_t, the posterior's) or "
            "'large' (β_t); nothing else is implemented.",
        )
        for key in ("diffusion.variance", "sample.variance")
    ),
    (
        "eval.sampler",
        SAMPLERS.__contains__,
        f"eval.sampler={{value!r}} is not a sampler; choose one of {', '.join(SAMPLERS)}.",
    ),
    (
        "trainer.precision",
        lambda p: str(p) in PRECISIONS,
        f"trainer.precision={{value!r}} is not a Lightning precision; use one of {', '.join(PRECISIONS)} "
        "(32-true on CPU, bf16-mixed on recent GPUs).",
    ),
    (
        "diffusion.num_timesteps",
        lambda T: positive_int(T) and T >= 2,
        "diffusion.num_timesteps={value!r} must be an integer of at least 2.",
    ),
    (
        "trainer.max_steps",
        positive_int,
        "trainer.max_steps={value!r} must be a positive integer: a run with no training step would "
        "evaluate an untrained network as if it were a result.",
    ),
    ("data.batch_size", positive_int, "data.batch_size={value!r} must be a positive integer."),
    ("data.eval_batch_size", positive_int, "data.eval_batch_size={value!r} must be a positive integer."),
    (
        "seed",
        count,
        "seed={value!r} must be a non-negative integer (it seeds the initialisation, the batch order and "
        "the noise).",
    ),
    ("optim.lr", lambda lr: lr > 0, "optim.lr={value!r} must be positive."),
    ("optim.ema_decay", lambda d: 0 <= d < 1, "optim.ema_decay={value!r} must be in [0, 1)."),
    ("run.checkpoint_every", positive_int, "run.checkpoint_every={value!r} must be a positive integer."),
    (
        "trainer.val_check_interval",
        positive_int,
        "trainer.val_check_interval={value!r} must be a positive integer (steps between validations).",
    ),
    ("sample.num_images", count, "sample.num_images={value!r} must be 0 (no grid) or a positive integer."),
    ("eval.budget_base", lambda b: b >= 0, "eval.budget_base={value!r} must be 0 or positive."),
    (
        "eval.budget_samples",
        lambda n: n == 0 or n >= 4,
        "eval.budget_samples={value!r} must be 0 (none) or at least 4.",
    ),
)
"""The rules of single settings: (key, valid, one-paragraph message). Rules that relate two
settings (a step count and the schedule's length, the model and the data) are `cli/checks.py`'s."""


def lookup(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def validate(resolved: dict[str, Any]) -> None:
    """Every single-setting rule, in order; the first broken one is the error."""
    for key, valid, message in RULES:
        value = lookup(resolved, key)
        if not valid(value):
            raise ConfigError(message.format(value=value))


@dataclass(frozen=True)
class DiffusionSpec:
    """The forward process and the reverse variance every bound and ancestral chain uses."""

    schedule: str
    num_timesteps: int
    variance: VarianceType


@dataclass(frozen=True)
class DataSpec:
    """A dataset by name, the batch size, the split (the same for every run seed) and the rest of
    its options, passed to its datamodule as they are."""

    name: str
    batch_size: int
    split_seed: int
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimSpec:
    lr: float
    weight_decay: float
    warmup_steps: int
    ema_decay: float
    gradient_clip_val: float | None


@dataclass(frozen=True)
class SpeedSpec:
    """How fast, never what is computed (beyond float round-off)."""

    compile: bool
    channels_last: bool
    fused_adamw: bool
    threads: int


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler setting: `steps` 0 means every step of the schedule (ancestral only)."""

    name: str
    steps: int

    @classmethod
    def parse(cls, text: object) -> SamplerSpec:
        """`ddim-10` → ddim over 10 steps; a bare name (`ancestral`) runs every step."""
        name, _, steps = str(text).partition("-")
        sampler = SAMPLERS.get(name)
        if sampler is None or not (steps.isdigit() or (not steps and sampler.every_step)):
            raise ConfigError(
                f"eval.also_samplers has {text!r}, which is not a sampler setting: write <sampler>-<steps> "
                f"with a sampler among {', '.join(SAMPLERS)} and steps from 1 to diffusion.num_timesteps "
                "(e.g. eval.also_samplers=[ddim-10,ancestral-50]), or `ancestral` for all T steps."
            )
        return cls(name, int(steps) if steps else 0)

    @property
    def tag(self) -> str:
        """`ddim-10`, `ancestral` (every step): the suffix of its metrics (`fd_digits@ddim-10`)."""
        return f"{self.name}-{self.steps}" if self.steps else self.name


@dataclass(frozen=True)
class EvalSpec:
    """What the evaluation after training measures, on which images, with which samplers."""

    enabled: bool
    split: str
    num_images: int
    vlb_timesteps: int
    vlb_batch_timesteps: int
    ode_images: int
    ode_method: str
    ode_rtol: float
    ode_atol: float
    num_samples: int
    sample_batch_size: int
    sampler: SamplerSpec
    also_samplers: tuple[SamplerSpec, ...]
    ddim_eta: float
    ancestral_variance: VarianceType
    reference_split: str
    inception_weights: str | None
    trajectory_images: int
    trajectory_steps: int
    profile_timesteps: int
    gmm_timesteps: int
    budget_base: int
    budget_samples: int
    budget_sampler_steps: int


@dataclass(frozen=True)
class OutputSpec:
    """Where a run is written and logged: never part of what it computes."""

    root: str
    dir: str | None
    reuse: bool
    checkpoint_every: int
    wandb_project: str
    wandb_entity: str | None
    wandb_mode: str


@dataclass(frozen=True)
class RunSpec:
    """Everything a run is, typed. `resolved` keeps the resolved config as plain data: it is what
    config.yaml holds and what the run's identity hashes."""

    arm: Arm
    seed: int
    experiment: str
    profile: str
    data: DataSpec
    model: dict[str, Any]
    diffusion: DiffusionSpec
    optim: OptimSpec
    speed: SpeedSpec
    evaluation: EvalSpec
    trainer: dict[str, Any]
    sample_grid_images: int
    output: OutputSpec
    resolved: dict[str, Any]

    @property
    def streams(self) -> Streams:
        return Streams(self.seed)

    @property
    def max_steps(self) -> int:
        return int(self.trainer["max_steps"])

    def record(self) -> dict[str, Any]:
        """The typed settings as plain data, for results.json."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "resolved"}
        out["arm"] = {"head": self.arm.head, "weighting": self.arm.weighting, "label": self.arm.label}
        for name in ("data", "diffusion", "optim", "speed", "evaluation", "output"):
            out[name] = asdict(out[name])
        return out


def build_spec(cfg: DictConfig) -> RunSpec:
    """The one place config keys become typed settings, each checked by its rule first (a
    ConfigError names the key, the value and what to do)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    validate(resolved)
    data, ev, trainer = resolved["data"], resolved["eval"], resolved["trainer"]
    evaluation = EvalSpec(
        enabled=ev["enabled"],
        split=ev["split"],
        num_images=ev["num_images"],
        vlb_timesteps=ev["vlb_timesteps"],
        vlb_batch_timesteps=ev["vlb_batch_timesteps"],
        ode_images=ev["ode_images"],
        ode_method=ev["ode_method"],
        ode_rtol=ev["ode_rtol"],
        ode_atol=ev["ode_atol"],
        num_samples=ev["num_samples"],
        sample_batch_size=ev["sample_batch_size"],
        sampler=SamplerSpec(ev["sampler"], ev["sampler_steps"]),
        also_samplers=tuple(SamplerSpec.parse(s) for s in ev.get("also_samplers") or ()),
        ddim_eta=ev["ddim_eta"],
        ancestral_variance=resolved["sample"]["variance"],
        reference_split=ev["reference_split"],
        inception_weights=ev["inception_weights"],
        trajectory_images=ev["trajectory_images"],
        trajectory_steps=ev["trajectory_steps"],
        profile_timesteps=ev["profile_timesteps"],
        gmm_timesteps=ev["gmm_timesteps"],
        budget_base=ev["budget_base"],
        budget_samples=ev["budget_samples"],
        budget_sampler_steps=ev["budget_sampler_steps"],
    )
    optim = resolved["optim"]
    return RunSpec(
        arm=Arm(resolved["objective"]["head"], resolved["objective"]["weighting"]),
        seed=resolved["seed"],
        experiment=resolved["experiment"],
        profile=resolved["profile"],
        data=DataSpec(
            name=data["name"],
            batch_size=data["batch_size"],
            split_seed=data.get("split_seed", 0),
            options={k: v for k, v in data.items() if k not in ("name", "split_seed", "batch_size")},
        ),
        model={k: v for k, v in resolved["model"].items() if k != "name"},
        diffusion=DiffusionSpec(**resolved["diffusion"]),
        optim=OptimSpec(
            lr=optim["lr"],
            weight_decay=optim["weight_decay"],
            warmup_steps=optim["warmup_steps"],
            ema_decay=optim["ema_decay"],
            gradient_clip_val=trainer.get("gradient_clip_val"),
        ),
        speed=SpeedSpec(**resolved["speed"]),
        evaluation=evaluation,
        trainer={k: v for k, v in trainer.items() if k != "name"},
        sample_grid_images=resolved["sample"]["num_images"],
        output=OutputSpec(
            root=resolved["run"]["root"],
            dir=resolved["run"]["dir"],
            reuse=resolved["run"]["reuse"],
            checkpoint_every=resolved["run"]["checkpoint_every"],
            wandb_project=resolved["wandb"]["project"],
            wandb_entity=resolved["wandb"]["entity"],
            wandb_mode=resolved["wandb"]["mode"],
        ),
        resolved=resolved,
    )
