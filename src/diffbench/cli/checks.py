"""What the commands add to `rules.py`: the Inception weights a CIFAR-10 evaluation needs (the
evaluation knows where they are, a layer above the rules), and one way to say a refusal."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from diffbench import rules
from diffbench.evaluation.fidelity import INCEPTION_DATASETS, resolve_inception_weights
from diffbench.spec import RunSpec


def check_settings(cfg: DictConfig, here: bool = True) -> RunSpec:
    """`rules.check_settings`, then the offline Inception weights a CIFAR-10 evaluation needs."""
    spec = rules.check_settings(cfg, here)
    if spec.evaluation.enabled and spec.data.name in INCEPTION_DATASETS:
        resolve_inception_weights(spec.evaluation.inception_weights)
    return spec


def refuse(command: str, error: Exception) -> int:
    """A refused input: its one-paragraph message after the command's name, and exit code 2."""
    print(f"diffbench.{command}: {error}", file=sys.stderr)
    return 2
