"""The run spec: the resolved config turned, once, into typed and frozen settings. Everything past
this builder — training, evaluation, the run directory, the commands — takes these values, never a
config tree, so a setting is read in one place and a reader can follow it by its type."""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

from diffbench.config import ConfigError
from diffbench.core.arms import Arm
from diffbench.core.diffusion import VarianceType
from diffbench.schema import sampler_setting, validate
from diffbench.seeding import Streams

T = TypeVar("T")
ConfigTree = DictConfig
"""The composed config `build_spec` takes, named for modules that pass one on without reading it."""


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
        """`ddim-10` → ddim over 10 steps; a bare name (`ancestral`) runs every step. The text was
        checked by the schema (`eval.also_samplers`); anything else is a ConfigError all the same."""
        setting = sampler_setting(text)
        if setting is None:
            raise ConfigError(f"{text!r} is not a sampler setting: write <sampler>-<steps>, e.g. ddim-10.")
        return cls(*setting)

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
class ModelSpec:
    """The U-Net's shape: its constructor's arguments, as `model=` and `model.*` set them."""

    in_channels: int
    image_size: int
    base_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float
    num_heads: int
    norm_groups: int

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of `UNet` (and of its peers in the benchmarks)."""
        return {
            **asdict(self),
            "channel_mult": list(self.channel_mult),
            "attention_resolutions": list(self.attention_resolutions),
        }


@dataclass(frozen=True)
class TrainerSpec:
    """Lightning's Trainer arguments, passed through as they are (`max_steps` from the profile)."""

    accelerator: str
    devices: int
    num_nodes: int
    strategy: str
    precision: str | int
    val_check_interval: int
    log_every_n_steps: int
    max_steps: int
    gradient_clip_val: float | None = None

    def arguments(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def wants_gpu(self) -> bool:
        return str(self.accelerator) in ("gpu", "cuda")


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
    model: ModelSpec
    diffusion: DiffusionSpec
    optim: OptimSpec
    speed: SpeedSpec
    evaluation: EvalSpec
    trainer: TrainerSpec
    sample_grid_images: int
    output: OutputSpec
    resolved: dict[str, Any]

    @property
    def streams(self) -> Streams:
        return Streams(self.seed)

    @property
    def max_steps(self) -> int:
        return self.trainer.max_steps

    def record(self) -> dict[str, Any]:
        """The typed settings as plain data, for results.json."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "resolved"}
        out["arm"] = {"head": self.arm.head, "weighting": self.arm.weighting, "label": self.arm.label}
        for name in ("data", "diffusion", "optim", "speed", "evaluation", "output", "trainer"):
            out[name] = asdict(out[name])
        out["model"] = self.model.arguments()
        return out


class Missing(KeyError):
    """A setting the config lacks (a stored config.yaml cut short or written by another version)."""


def by_name(cls: type[T], resolved: dict[str, Any], section: str, **given: Any) -> T:
    """A section's spec with every field read from the setting of its name, but those `given`: a
    setting the schema declares becomes a typed field without a line here. A field with a default
    may be missing (a config.yaml written before the setting existed)."""
    settings = resolved.get(section)
    if not isinstance(settings, dict):
        raise Missing(section)
    values = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in given or (f.name not in settings and f.default is not MISSING):
            continue
        if f.name not in settings:
            raise Missing(f"{section}.{f.name}")
        values[f.name] = settings[f.name]
    return cls(**values, **given)


def build_spec(cfg: DictConfig) -> RunSpec:
    """The one place config keys become typed settings, every one checked against `schema.SCHEMA`
    first (a ConfigError names the key, the value, what it must be and an example); a setting that
    is missing (a stored config.yaml cut short) is a ConfigError too."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    validate(resolved)
    try:
        return from_resolved(resolved)
    except KeyError as missing:
        raise ConfigError(
            f"the config has no {missing.args[0]} setting, which this diffbench reads (a config.yaml "
            "cut short, or written by another version); nothing was trained or written."
        ) from None


def from_resolved(resolved: dict[str, Any]) -> RunSpec:
    data, ev, trainer, model = resolved["data"], resolved["eval"], resolved["trainer"], resolved["model"]
    evaluation = by_name(
        EvalSpec,
        resolved,
        "eval",
        sampler=SamplerSpec(ev["sampler"], ev["sampler_steps"]),
        also_samplers=tuple(SamplerSpec.parse(s) for s in ev.get("also_samplers") or ()),
        ancestral_variance=resolved["sample"]["variance"],
    )
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
        model=by_name(
            ModelSpec,
            resolved,
            "model",
            channel_mult=tuple(model["channel_mult"]),
            attention_resolutions=tuple(model["attention_resolutions"]),
        ),
        diffusion=by_name(DiffusionSpec, resolved, "diffusion"),
        optim=by_name(OptimSpec, resolved, "optim", gradient_clip_val=trainer.get("gradient_clip_val")),
        speed=by_name(SpeedSpec, resolved, "speed"),
        evaluation=evaluation,
        trainer=by_name(TrainerSpec, resolved, "trainer"),
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
