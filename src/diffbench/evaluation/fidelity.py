"""Sample quality between generated and real images through torch-fidelity, under honest names.

CIFAR-10 gets Inception-v3 features and the usual names (`fid`, `kid`, `precision`, `recall`),
comparable with papers. Digits, MNIST and gmm (digits-shaped) get the features of a classifier
trained on their real training split, and every metric carries the classifier's dataset as suffix
(`fd_digits`, `kid_digits`, …), never "FID" (README, "Metrics"). The
classifier path never touches the network.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

from diffbench.data.base import ArrayDataModule
from diffbench.data.vision import network_available
from diffbench.evaluation.features import (
    EXTRACTOR_NAMES,
    ClassifierCheckpoint,
    classifier_checkpoint,
    to_uint8,
)

CLASSIFIER_OF_DATASET = {"digits": "digits", "gmm": "digits", "mnist": "mnist"}
"""Which classifier's features measure each dataset; gmm samples are 8×8 digits-like images."""
INCEPTION_DATASETS = ("cifar10",)
INCEPTION_EXTRACTOR = "inception-v3-compat"
KID_SUBSET_SIZE = 1000
METRIC_KEYS = {
    torch_fidelity.KEY_METRIC_FID: "fd",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
}
"""torch-fidelity's result keys → our metric stems; `fd` becomes `fid` only with Inception features."""


class InceptionWeightsMissingError(FileNotFoundError):
    """Inception-v3 weights are neither on disk nor downloadable; the message says where to put them."""


class ImageBytes(Dataset):
    """Images as torch-fidelity reads them: one uint8 (C, H, W) tensor per item, no label tuple."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def quantize(images: Tensor, num_levels: int | None) -> Tensor:
    """Round images in [−1, 1] to the data's `num_levels` grey levels, as they would be stored, so
    generated images are judged in the same form as the real ones (None: continuous data, kept)."""
    images = images.clamp(-1, 1)
    if num_levels is None:
        return images
    return ((images + 1) / 2 * (num_levels - 1)).round() / (num_levels - 1) * 2 - 1


def default_inception_path() -> Path:
    """Where torch-fidelity's own download lands (torch hub's checkpoint folder): one copy serves both."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(URL_INCEPTION_V3).path).name


def resolve_inception_weights(weights: str | None) -> str | None:
    """The Inception weights file to load, or None to let torch-fidelity download it (only when online).

    An explicit path is never replaced by a download: a missing file there is an error.
    """
    path = Path(weights) if weights else default_inception_path()
    if path.is_file():
        return str(path)
    if weights is None and network_available(URL_INCEPTION_V3):
        return None
    reason = "it was not found" if weights else "it is not there and there is no network to download it"
    raise InceptionWeightsMissingError(
        f"Inception-v3 weights for cifar10's FID/KID/precision/recall are missing: {reason} "
        f"({path.absolute()}). "
        f"Download {URL_INCEPTION_V3} (about 90 MB) on a machine with network access and put it at "
        f"{default_inception_path()}, or anywhere else and pass that file as inception_weights."
    )


def sample_quality(
    samples: Tensor,
    reference: Tensor,
    dataset: str,
    num_levels: int | None = None,
    inception_weights: str | None = None,
    data_root: str = "data",
    batch_size: int = 256,
    split_seed: int = 0,
    checkpoint: ClassifierCheckpoint | None = None,
) -> dict[str, float | int | str]:
    """Fréchet distance, KID and precision/recall of `samples` against real `reference` images.

    Both are (N, C, H, W) in [−1, 1]; samples are first quantized to the data's `num_levels`. The
    record holds the metrics, both sample counts, the feature extractor's name, KID's subset size
    (min(1000, N, N_ref), so a few hundred reference images still work) and, for classifier
    features, the classifier's test accuracy. `data_root` locates MNIST to train its classifier on
    first use; it is trained on the train split of `split_seed` when the samples are of its own
    dataset, so the reference images (that split's test images) are never its training data. The
    caller adds the sampler's settings. A `checkpoint` already resolved is used as it is (scoring
    many sample sets against one reference loads and hashes the classifier's data once).
    """
    if dataset not in CLASSIFIER_OF_DATASET and dataset not in INCEPTION_DATASETS:
        known = ", ".join([*CLASSIFIER_OF_DATASET, *INCEPTION_DATASETS])
        raise ValueError(f"no sample-quality features for dataset {dataset!r}; available: {known}")
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(
            f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} differ in shape"
        )
    # Precision/recall need each image's 3 nearest neighbours within its own set.
    if min(len(samples), len(reference)) < 4:
        raise ValueError("sample quality needs at least 4 samples and 4 reference images")
    record: dict[str, float | int | str] = {}
    if dataset in INCEPTION_DATASETS:
        extractor, weights, suffix = INCEPTION_EXTRACTOR, resolve_inception_weights(inception_weights), ""
    else:
        classifier = CLASSIFIER_OF_DATASET[dataset]
        checkpoint = checkpoint or dataset_classifier(dataset, data_root, split_seed)
        extractor, weights, suffix = EXTRACTOR_NAMES[classifier], str(checkpoint.path), f"_{classifier}"
        record["classifier_test_accuracy"] = checkpoint.test_accuracy
    kid_subset_size = min(KID_SUBSET_SIZE, len(samples), len(reference))
    metrics = torch_fidelity.calculate_metrics(
        input1=ImageBytes(to_uint8(quantize(samples.detach().cpu(), num_levels))),
        input2=ImageBytes(to_uint8(reference.detach().cpu())),
        fid=True,
        kid=True,
        prc=True,
        feature_extractor=extractor,
        feature_extractor_weights_path=weights,
        kid_subset_size=kid_subset_size,
        batch_size=batch_size,
        cuda=torch.cuda.is_available(),
        # In-memory tensors: loader worker processes would only add start-up time.
        save_cpu_ram=True,
        cache=False,
        verbose=False,
    )
    for key, stem in METRIC_KEYS.items():
        name = "fid" if stem == "fd" and not suffix else stem
        record[f"{name}{suffix}"] = float(metrics[key])
    record.update(
        num_samples=len(samples),
        num_reference=len(reference),
        feature_extractor=extractor,
        kid_subset_size=kid_subset_size,
    )
    return record


def dataset_classifier(dataset: str, data_root: str, split_seed: int) -> ClassifierCheckpoint:
    """The classifier whose features score `dataset`: trained on the train split of `split_seed`
    when the samples are of its own dataset (gmm borrows the digits classifier of split 0)."""
    classifier = CLASSIFIER_OF_DATASET[dataset]
    return classifier_checkpoint(
        classifier, root=data_root, split_seed=split_seed if classifier == dataset else 0
    )


def datamodule_scorer(
    datamodule: ArrayDataModule, dataset: str, reference_split: str, inception_weights: str | None = None
) -> Callable[[Tensor], dict]:
    """`sample_quality` of any images against the datamodule's real `reference_split`, with the
    classifier of the datamodule's own split, resolved once for every set the scorer scores."""
    root = getattr(datamodule, "root", "data")
    checkpoint = (
        dataset_classifier(dataset, root, datamodule.split_seed) if dataset in CLASSIFIER_OF_DATASET else None
    )
    return functools.partial(
        sample_quality,
        reference=datamodule.split(reference_split),
        dataset=dataset,
        num_levels=datamodule.num_levels,
        inception_weights=inception_weights,
        data_root=root,
        split_seed=datamodule.split_seed,
        checkpoint=checkpoint,
    )
