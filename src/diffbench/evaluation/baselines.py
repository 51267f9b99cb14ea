"""What the arms' numbers should be compared with: the NLL of a model that knows nothing but
each pixel's own histogram, and the sample metric's floor, real images against real images.

Neither depends on the trained model; they are recorded beside the metrics (`evaluation.baselines`
in results.json), never as arm metrics."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffbench.data.base import ArrayDataModule
from diffbench.evaluation.fidelity import datamodule_scorer
from diffbench.spec import EvalSpec


def to_levels(images: Tensor, num_levels: int) -> Tensor:
    """Images in [−1, 1] on `num_levels` evenly spaced values → integers 0..L−1."""
    return ((images.double() + 1) / 2 * (num_levels - 1)).round().long().clamp(0, num_levels - 1)


def histogram_nll_bpd(train: Tensor, test: Tensor, num_levels: int | None) -> float:
    """Mean NLL (bits/dim) of `test` under independent per-pixel models fit on `train`.

    Discrete data: a categorical over the L levels per pixel with add-one (Laplace) smoothing,
    p = (count + 1) / (N + L), so a level never seen in training costs finite bits. Continuous
    data (`num_levels` None): a Gaussian per pixel by maximum likelihood, scored as a density.
    """
    train, test = train.flatten(1).double(), test.flatten(1).double()
    num_dims = train.shape[1]
    if num_levels is None:
        mean, var = train.mean(0), train.var(0, correction=0)
        nats = 0.5 * (torch.log(2 * math.pi * var) + (test - mean).pow(2) / var)
    else:
        counts = torch.zeros(num_dims, num_levels, dtype=torch.float64)
        counts.scatter_add_(1, to_levels(train, num_levels).T, torch.ones(num_dims, len(train)).double())
        log_probs = (counts + 1).log() - math.log(len(train) + num_levels)
        nats = -log_probs.gather(1, to_levels(test, num_levels).T).T
    return float(nats.sum(1).mean() / (num_dims * math.log(2)))


def real_vs_real_fd(real: Tensor, score: Callable[[Tensor], dict]) -> dict[str, float]:
    """The sample metrics' Fréchet distance with real images in place of samples (`score` holds the
    reference): what a perfect model would score with as many samples (FD is biased upwards at
    finite N)."""
    quality = score(real)
    return {
        f"{name}_real_vs_real": quality[name] for name in quality if name == "fid" or name.startswith("fd_")
    }


def evaluate_baselines(datamodule: ArrayDataModule, x0: Tensor, ev: EvalSpec, data_name: str) -> dict:
    """The `baselines` settings entry: the histogram's NLL on the images `nll_vlb_bpd` is measured
    on, and the FD floor from the first `num_samples` training images against the reference split."""
    train = datamodule.split("train")
    real = train[: ev.num_samples]
    levels = datamodule.num_levels
    floor = real_vs_real_fd(
        real, datamodule_scorer(datamodule, data_name, ev.reference_split, ev.inception_weights)
    )
    model = "categorical, add-one smoothing" if levels else "Gaussian, maximum likelihood"
    return {
        "histogram_nll_bpd": histogram_nll_bpd(train, x0, levels),
        "histogram": f"independent per-pixel {model}, fit on train ({len(train)} images), "
        f"scored on {ev.split} ({len(x0)} images)",
        **floor,
        "real_split": f"train ({len(real)} images)",
    }
