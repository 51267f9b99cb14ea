"""The digits classifier, its torch-fidelity registration and sample-quality metrics, all offline."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

import diffbench.evaluation.fidelity as fidelity
from diffbench.data.base import split_indices
from diffbench.data.digits import DigitsDataModule
from diffbench.evaluation.features import (
    ClassifierFeatureExtractor,
    classifier_checkpoint,
    classifier_data,
    from_uint8,
    to_uint8,
)
from diffbench.evaluation.fidelity import InceptionWeightsMissingError, sample_quality


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One classifier cache for the module: the digits classifier is trained once, by the first test."""
    return tmp_path_factory.mktemp("diffbench-cache")


@pytest.fixture(autouse=True)
def offline_with_tmp_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails the test, so nothing can be downloaded by accident."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a test tried to use the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("DIFFBENCH_CACHE", str(cache))


@pytest.mark.slow
def test_classifier_is_accurate_and_cached(cache: Path) -> None:
    checkpoint = classifier_checkpoint("digits")
    assert checkpoint.test_accuracy > 0.9
    assert checkpoint.path.parent == cache and checkpoint.path.is_file()
    written = checkpoint.path.stat().st_mtime_ns
    again = classifier_checkpoint("digits")
    assert again == checkpoint and again.path.stat().st_mtime_ns == written
    assert not list(cache.glob("*.tmp"))


@pytest.mark.parametrize("split_seed", [0, 3])
def test_every_run_seed_shares_one_test_split_that_the_classifier_never_trains_on(split_seed: int) -> None:
    """The split is data.split_seed's, whatever the run seed; the classifier trains on exactly that
    split's train images, which share no image index with its test split (the sample metrics'
    reference). Before, a run with seed s ≥ 1 scored against seed s's test split, part of which
    was the classifier's training data."""
    runs = [DigitsDataModule(seed=seed, split_seed=split_seed) for seed in (0, 1, 7)]
    tests = [run.split("test") for run in runs]
    assert all(torch.equal(tests[0], other) for other in tests[1:])
    data = classifier_data("digits", "data", False, split_seed)
    assert torch.equal(data["train"][0], from_uint8(to_uint8(runs[0].split("train"))))
    assert torch.equal(data["test"][0], from_uint8(to_uint8(tests[0])))
    index = split_indices(1797, runs[0].val_fraction, runs[0].test_fraction, split_seed)
    assert not set(index["train"].tolist()) & set(index["test"].tolist())
    other = DigitsDataModule(split_seed=split_seed + 1).split("test")
    assert not torch.equal(other, tests[0])


def test_registered_extractor_reads_uint8_like_torch_fidelity() -> None:
    assert FEATURE_EXTRACTORS_REGISTRY["digits-classifier"] is ClassifierFeatureExtractor
    weights = str(classifier_checkpoint("digits").path)
    extractor = create_feature_extractor(
        "digits-classifier", ["logits", "features"], cuda=False, feature_extractor_weights_path=weights
    )
    images, labels = classifier_data("digits", root="unused", download=False)["test"]
    logits, features = extractor(to_uint8(images))
    assert features.shape == (len(images), 64) and (features >= 0).all()
    # Through the uint8 convention the extractor still classifies the real test digits.
    assert (logits.argmax(1) == labels).float().mean() > 0.9
    with pytest.raises(ValueError, match="uint8"):
        extractor(images)


def test_feature_distance_is_zero_on_real_data_and_large_on_noise(digits: DigitsDataModule) -> None:
    test, val = digits.split("test"), digits.split("val")
    noise = torch.rand(len(val), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    itself = sample_quality(test, test, "digits", num_levels=17)
    held_out = sample_quality(val, test, "digits", num_levels=17)
    random = sample_quality(noise, test, "digits", num_levels=17)
    assert abs(itself["fd_digits"]) < 1e-3
    assert held_out["fd_digits"] < 0.05 * random["fd_digits"]
    assert abs(held_out["kid_digits"]) < 0.05 * random["kid_digits"]
    assert min(held_out["precision_digits"], held_out["recall_digits"]) > 0.8
    assert max(random["precision_digits"], random["recall_digits"]) < 0.1
    # 180 samples against 359 references: KID's subsets shrink to fit.
    assert held_out["kid_subset_size"] == len(val) == held_out["num_samples"]
    assert held_out["num_reference"] == len(test)
    assert held_out["feature_extractor"] == "digits-classifier"
    assert held_out["classifier_test_accuracy"] > 0.9


def test_gmm_is_measured_with_digits_features_and_never_called_fid(digits: DigitsDataModule) -> None:
    record = sample_quality(digits.split("val") * 1.2, digits.split("test"), "gmm", num_levels=None)
    metric_names = {key for key, value in record.items() if isinstance(value, float)}
    assert {"fd_digits", "kid_digits", "precision_digits", "recall_digits"} <= metric_names
    assert not any("fid" in name for name in record)


def test_bad_requests_are_refused(digits: DigitsDataModule) -> None:
    test = digits.split("test")
    with pytest.raises(ValueError, match="available"):
        sample_quality(test, test, "imagenet")
    with pytest.raises(ValueError, match="shape"):
        sample_quality(test[:, :, :4], test, "digits")


def test_cifar10_without_inception_weights_offline_says_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = torch.zeros(8, 3, 32, 32)
    missing = tmp_path / "inception.pth"
    with pytest.raises(InceptionWeightsMissingError) as error:
        sample_quality(images, images, "cifar10", num_levels=256, inception_weights=str(missing))
    assert str(missing) in str(error.value) and URL_INCEPTION_V3 in str(error.value)

    # No path given: the default place is torch hub's checkpoint folder, and offline nothing is downloaded.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fidelity, "network_available", lambda url: False)
    with pytest.raises(InceptionWeightsMissingError, match="no network") as error:
        sample_quality(images, images, "cifar10", num_levels=256)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(error.value)
