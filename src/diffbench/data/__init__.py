"""Datamodules by config name; each exposes `num_levels` and `image_shape` to the losses."""

from __future__ import annotations

from typing import Any

from diffbench.data.base import ArrayDataModule
from diffbench.data.digits import DigitsDataModule
from diffbench.data.gmm import GMMDataModule
from diffbench.data.vision import CIFAR10DataModule, MNISTDataModule

DATAMODULES: dict[str, type[ArrayDataModule]] = {
    "digits": DigitsDataModule,
    "gmm": GMMDataModule,
    "mnist": MNISTDataModule,
    "cifar10": CIFAR10DataModule,
}


def build_datamodule(name: str, options: dict[str, Any]) -> ArrayDataModule:
    """Instantiate the datamodule `name` with `options` as its arguments."""
    if name not in DATAMODULES:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATAMODULES))}")
    return DATAMODULES[name](**options)
