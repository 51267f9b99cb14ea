"""Small CNN classifiers whose penultimate features stand in for Inception's on digits and MNIST.

Inception-v3 features say little about 8×8 grey digits, so their Fréchet distance, KID and
precision/recall use a classifier trained on the dataset's own real training split (of the same
`split_seed` as the runs, so it never sees their test images), and carry its
name (`fd_digits`, never "FID"; README, "Metrics"). A classifier is
trained the first time it is needed (seconds for digits), cached under a hash of its data and of
this file, and registered with torch-fidelity as a feature extractor (`digits-classifier`,
`mnist-classifier`) that takes torch-fidelity's uint8 images like Inception does.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from diffbench import atomic
from diffbench.data.base import split_indices
from diffbench.data.digits import DigitsDataModule, digits_images
from diffbench.data.gmm import cache_dir
from diffbench.data.vision import MNISTDataModule

EXTRACTOR_NAMES = {"digits": "digits-classifier", "mnist": "mnist-classifier"}
"""torch-fidelity name of each dataset's classifier; metrics computed with it end in `_<dataset>`."""
DATASET_OF_EXTRACTOR = {name: dataset for dataset, name in EXTRACTOR_NAMES.items()}


@dataclass(frozen=True)
class ClassifierSpec:
    """Architecture and training budget of a classifier; stored with its weights, part of its cache key."""

    image_shape: tuple[int, int, int]
    widths: tuple[int, ...]
    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    feature_dim: int = 64
    num_classes: int = 10
    seed: int = 0


# Each conv block halves the image, so len(widths) blocks take 8×8 digits and 32×32 MNIST down to 2×2.
CLASSIFIER_SPECS = {
    "digits": ClassifierSpec(image_shape=(1, 8, 8), widths=(32, 64), epochs=30),
    "mnist": ClassifierSpec(image_shape=(1, 32, 32), widths=(16, 16, 32, 64), epochs=3, batch_size=128),
}


def to_uint8(images: Tensor) -> Tensor:
    """Floats in [−1, 1] → bytes 0..255 (clamped, rounded): torch-fidelity's image convention."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(images: Tensor) -> Tensor:
    """Bytes 0..255 → floats in [−1, 1], the inverse of `to_uint8` on 8-bit data."""
    return images.float() / 127.5 - 1


class SmallClassifier(nn.Module):
    """Conv–ReLU–max-pool blocks down to 2×2, a ReLU layer of `feature_dim` features, then class logits."""

    def __init__(self, spec: ClassifierSpec) -> None:
        super().__init__()
        channels, size, _ = spec.image_shape
        layers: list[nn.Module] = []
        for width in spec.widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels, size = width, size // 2
        self.body = nn.Sequential(
            *layers, nn.Flatten(), nn.Linear(channels * size * size, spec.feature_dim), nn.ReLU()
        )
        self.head = nn.Linear(spec.feature_dim, spec.num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Penultimate features and logits of images in [−1, 1]."""
        features = self.body(images)
        return features, self.head(features)


def classifier_data(
    dataset: str, root: str, download: bool | str, split_seed: int = 0
) -> dict[str, tuple[Tensor, Tensor]]:
    """Real train and test images with labels, seen through `to_uint8` as the extractor will see them.

    The train split is the one the diffusion models train on under the same `split_seed` (it does
    not depend on the run's seed), so the classifier never sees the test images that the sample
    metrics use as reference. MNIST's test split is the official one whatever the split seed.
    """
    if dataset == "digits":
        images, labels = digits_images()
        defaults = DigitsDataModule()
        index = split_indices(len(images), defaults.val_fraction, defaults.test_fraction, split_seed)
        splits = {name: (images[index[name]], labels[index[name]]) for name in ("train", "test")}
    elif dataset == "mnist":
        splits = MNISTDataModule(root=root, download=download, split_seed=split_seed).labelled_splits()
    else:
        raise ValueError(f"no classifier for dataset {dataset!r}; available: {', '.join(CLASSIFIER_SPECS)}")
    return {name: (from_uint8(to_uint8(splits[name][0])), splits[name][1]) for name in ("train", "test")}


@torch.no_grad()
def accuracy(model: SmallClassifier, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Fraction classified correctly, in batches so MNIST's whole test set never sits on the GPU at once."""
    model.eval()
    device = next(model.parameters()).device
    correct = sum(
        int((model(x.to(device))[1].argmax(1) == y.to(device)).sum())
        for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True)
    )
    return correct / len(labels)


def train_classifier(
    spec: ClassifierSpec, data: dict[str, tuple[Tensor, Tensor]], device: torch.device
) -> tuple[SmallClassifier, float]:
    """Adam on cross-entropy for a fixed number of epochs, seeded; returns the model and its test
    accuracy. Gradients are on whatever the caller's mode (an evaluation may run under no_grad)."""
    images, labels = (t.to(device) for t in data["train"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = SmallClassifier(spec).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr)
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    with torch.enable_grad():
        for _ in range(spec.epochs):
            for batch in torch.randperm(len(images), generator=generator).split(spec.batch_size):
                batch = batch.to(device)
                loss = F.cross_entropy(model(images[batch])[1], labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model, accuracy(model, *data["test"])


def cache_key(spec: ClassifierSpec, data: dict[str, tuple[Tensor, Tensor]]) -> str:
    """Hash of the code, the spec and the data: any change retrains instead of reusing stale weights."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(json.dumps(asdict(spec), sort_keys=True).encode())
    for name in sorted(data):
        for tensor in data[name]:
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class ClassifierCheckpoint:
    """A trained classifier's weights file and how good it is, to report beside the metrics it defines."""

    path: Path
    test_accuracy: float
    train_seconds: float


def classifier_checkpoint(
    dataset: str,
    root: str = "data",
    download: bool | str = "auto",
    device: str | None = None,
    split_seed: int = 0,
) -> ClassifierCheckpoint:
    """The cached classifier for `dataset` (digits or mnist) and split, trained and saved atomically
    on first use. `root` and `download` locate the MNIST files (digits are embedded). Training runs
    on `device`, by default the GPU when there is one.
    """
    data = classifier_data(dataset, root, download, split_seed)
    spec = CLASSIFIER_SPECS[dataset]
    path = cache_dir() / f"classifier-{dataset}-{cache_key(spec, data)}.pt"
    if not path.exists():
        start = time.perf_counter()
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, test_accuracy = train_classifier(spec, data, target)
        payload = {
            "dataset": dataset,
            "spec": asdict(spec),
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "test_accuracy": test_accuracy,
            "train_seconds": time.perf_counter() - start,
        }
        atomic.save_with(path, lambda tmp: torch.save(payload, tmp))
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return ClassifierCheckpoint(path, payload["test_accuracy"], payload["train_seconds"])


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity's view of a trained SmallClassifier, registered once per dataset.

    Input: uint8 images (B, C, H, W) in 0..255, torch-fidelity's convention (C = 1 here, unlike
    Inception's 3). Features: `features` (the penultimate ReLU layer: FD, KID, precision/recall)
    and `logits` (Inception Score). `feature_extractor_weights_path` is a `classifier_checkpoint`
    file; without one the dataset's default checkpoint is trained or loaded.
    """

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, features_list)
        dataset = DATASET_OF_EXTRACTOR[name]
        path = feature_extractor_weights_path or classifier_checkpoint(dataset).path
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["dataset"] != dataset:
            raise ValueError(f"{path} holds the {payload['dataset']} classifier, not the one for {name}")
        self.spec = ClassifierSpec(**payload["spec"])
        self.model = SmallClassifier(self.spec)
        self.model.load_state_dict(payload["state_dict"])
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return True

    def get_dummy_input_for_compile(self) -> Tensor:
        return torch.zeros((1, *self.spec.image_shape), dtype=torch.uint8)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != self.spec.image_shape:
            shape = ", ".join(map(str, self.spec.image_shape))
            got = f"{images.dtype} {tuple(images.shape)}"
            raise ValueError(f"{self.name} expects uint8 images of shape (B, {shape}), got {got}")
        features, logits = self.model(from_uint8(images))
        outputs = {"features": features, "logits": logits}
        return tuple(outputs[name] for name in self.features_list)


for _name in EXTRACTOR_NAMES.values():
    register_feature_extractor(_name, ClassifierFeatureExtractor)
