"""The baselines beside the arms' numbers: a per-pixel histogram's NLL against hand computations,
and the real-vs-real floor of the sample metric on digits."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import norm

from diffbench.data.base import levels_to_unit_range
from diffbench.data.digits import DigitsDataModule
from diffbench.evaluation.baselines import evaluate_baselines, histogram_nll_bpd, real_vs_real_fd
from diffbench.evaluation.fidelity import sample_quality


def as_images(levels: list[list[int]], num_levels: int) -> torch.Tensor:
    """Rows of per-pixel levels → (N, 1, 1, D) images in [−1, 1], as the datamodules store them."""
    return levels_to_unit_range(torch.tensor(levels), num_levels)[:, None, None, :]


def test_categorical_histogram_matches_a_hand_count() -> None:
    """3 pixels, 3 levels, 4 training images; the test image [2, 2, 0] uses levels that pixels 1
    and 2 never took in training, which add-one smoothing prices at 1/(N + L)."""
    train = [[0, 1, 2], [0, 0, 2], [1, 1, 2], [0, 2, 2]]
    test = [[0, 1, 2], [2, 2, 0]]
    num_levels, n = 3, len(train)
    expected = []
    for image in test:
        bits = 0.0
        for d, level in enumerate(image):
            count = sum(row[d] == level for row in train)
            bits -= np.log2((count + 1) / (n + num_levels))
        expected.append(bits / 3)
    # Pixel 0 of the first test image: level 0 seen 3 times of 4, p = 4/7.
    assert expected[0] == pytest.approx(-(np.log2(4 / 7) + np.log2(3 / 7) + np.log2(5 / 7)) / 3)
    got = histogram_nll_bpd(as_images(train, num_levels), as_images(test, num_levels), num_levels)
    assert got == pytest.approx(np.mean(expected), rel=1e-12)


def test_gaussian_histogram_is_the_maximum_likelihood_density() -> None:
    generator = torch.Generator().manual_seed(0)
    shift = torch.tensor([0.5, -0.2, 0.0, 0.3]).view(1, 1, 2, 2)
    train = torch.randn(50, 1, 2, 2, generator=generator, dtype=torch.float64) * 0.3 + shift
    test = torch.randn(7, 1, 2, 2, generator=generator, dtype=torch.float64) * 0.4 + shift
    x, fit = test.flatten(1).numpy(), train.flatten(1).numpy()
    log_density = norm.logpdf(x, loc=fit.mean(0), scale=fit.std(0, ddof=0)).sum(1)
    expected = np.mean(-log_density / (4 * math.log(2)))
    assert histogram_nll_bpd(train, test, None) == pytest.approx(expected, rel=1e-12)


def test_constant_pixels_cost_only_the_smoothing() -> None:
    """Each pixel always takes the same level: the seen level has p = (N + 1)/(N + L), near 1."""
    n, num_levels = 1000, 17
    image = torch.tensor([[0, 16, 8, 3]])
    train = as_images(image.repeat(n, 1).tolist(), num_levels)
    got = histogram_nll_bpd(train, as_images(image.tolist(), num_levels), num_levels)
    assert got == pytest.approx(-math.log2((n + 1) / (n + num_levels)), rel=1e-12)
    assert 0 < got < 0.025


@pytest.mark.slow
def test_real_vs_real_floor_is_small_and_reuses_the_sample_metric(digits: DigitsDataModule) -> None:
    train, reference = digits.split("train")[:200], digits.split("test")[:200]
    score = functools.partial(sample_quality, reference=reference, dataset="digits", num_levels=17)
    floor = real_vs_real_fd(train, score)
    assert list(floor) == ["fd_digits_real_vs_real"]
    value = floor["fd_digits_real_vs_real"]
    assert math.isfinite(value) and value >= 0
    assert value == sample_quality(train, reference, "digits", num_levels=17)["fd_digits"]
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert value < 0.1 * sample_quality(noise, reference, "digits", num_levels=17)["fd_digits"]


def test_evaluate_baselines_records_both_with_their_splits(digits: DigitsDataModule) -> None:
    cfg = OmegaConf.create(
        {"num_samples": 200, "reference_split": "test", "split": "test", "inception_weights": None}
    )
    x0 = digits.split("test")[:64]
    record = evaluate_baselines(digits, x0, cfg, "digits")
    assert record["real_split"] == "train (200 images)"
    assert record["histogram_nll_bpd"] == histogram_nll_bpd(digits.split("train"), x0, 17)
    # The histogram knows each pixel's marginal, so it beats a uniform guess over 17 levels.
    assert 0 < record["histogram_nll_bpd"] < math.log2(17)
    assert "add-one" in record["histogram"] and "test (64 images)" in record["histogram"]
    assert 0 <= record["fd_digits_real_vs_real"] < math.inf
