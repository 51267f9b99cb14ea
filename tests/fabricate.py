"""Run directories with numbers chosen by a test, written with the real run-directory writer, so
the report reads them exactly as it reads a sweep's."""

from __future__ import annotations

from pathlib import Path

from diffbench.core.arms import Arm
from diffbench.rundir import RunDir

DEFAULT_MARGINS = {"nll_vlb_bpd": 0.05, "val_vlb_bpd": 0.05}


def write_config(
    directory: Path,
    arm: Arm,
    seed: int,
    profile: str = "default",
    lr: float = 1e-3,
    margins: dict[str, float] | None = None,
    threads: int = 0,
    evaluation: dict | None = None,
    clip: float | None = None,
) -> None:
    directory.mkdir(parents=True)
    config = {
        "experiment": arm.label,
        "objective": {"head": arm.head, "weighting": arm.weighting, "name": arm.head},
        "seed": seed,
        "profile": profile,
        "data": {"name": "digits", "batch_size": 128},
        "model": {"name": "unet_small"},
        "optim": {"lr": lr},
        "trainer": {"max_steps": 100, "gradient_clip_val": clip},
        "diffusion": {"schedule": "linear", "num_timesteps": 1000, "variance": "small"},
        "speed": {"threads": threads},
        "run": {"root": "anywhere"},
        "report": {"margins": DEFAULT_MARGINS if margins is None else margins},
        **({"eval": evaluation} if evaluation is not None else {}),
    }
    RunDir(directory).write_config(config)


def write_run(
    root: Path,
    arm: Arm,
    seed: int,
    metrics: dict[str, float],
    budgets: list[dict] | None = None,
    name: str | None = None,
    extra: dict | None = None,
    **config: object,
) -> Path:
    """A complete run of `arm` and `seed` with these final metrics and per-budget rows (and any
    further results.json fields in `extra`)."""
    directory = (
        root / "trials" / f"{config.get('profile', 'default')}-digits" / arm.label / (name or f"s{seed}")
    )
    write_config(directory, arm, seed, **config)  # type: ignore[arg-type]
    RunDir(directory).write_results(
        {
            "status": "complete",
            "experiment": arm.label,
            "arm": arm.label,
            "head": arm.head,
            "weighting": arm.weighting,
            "seed": seed,
            "steps": 100,
            "metrics": metrics,
            "budgets": budgets or [],
            **(extra or {}),
        }
    )
    return directory
