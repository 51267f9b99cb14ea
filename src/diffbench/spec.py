"""The run spec: the resolved config turned, once, into typed and frozen settings. Everything past
this builder — training, evaluation, the run directory, the commands — takes these values, never a
config tree, so a setting is read in one place and a reader can follow it by its type."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from diffbench.config import ConfigError
from diffbench.core.arms import Arm
from diffbench.core.diffusion import VarianceType
from diffbench.sampling.samplers import SAMPLERS
from diffbench.schema import validate
from diffbench.seeding import Streams


def positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
    """The one place config keys become typed settings, every one checked against `schema.SCHEMA`
    first (a ConfigError names the key, the value, what it must be and an example)."""
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
