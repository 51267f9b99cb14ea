"""MNIST and CIFAR-10 read from their official on-disk formats; downloaded only when the network allows.

Both are published as a train/test pair of 8-bit images. The official test set is the test split
(the one papers report on); the validation split is carved from the official training set by
`split_seed`. When the files are absent and cannot be downloaded, `DatasetMissingError` says which files
go where, so an offline machine can be prepared by hand.
"""

from __future__ import annotations

import pickle
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.datasets.utils import download_and_extract_archive

from diffbench.data.base import ArrayDataModule, levels_to_unit_range, split_indices


class DatasetMissingError(FileNotFoundError):
    """A dataset's files are not on disk and could not be downloaded; the message says how to provide them."""


def network_available(url: str, timeout: float = 3.0) -> bool:
    """Whether `url`'s host accepts a connection, so `download="auto"` never starts a doomed download."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_cifar_batch(path: Path) -> tuple[Tensor, Tensor]:
    """One pickled CIFAR batch → uint8 images (N, 3, 32, 32) and int64 labels.

    The official batches are Python 2 pickles, read with latin1 as torchvision does (their keys then
    load as str). Unpickling can run code stored in the file: read only files from a trusted source.
    """
    with path.open("rb") as file:
        batch = pickle.load(file, encoding="latin1")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = torch.as_tensor(batch["labels"], dtype=torch.long)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(
            f"{path} is not a CIFAR batch: expected 'data' of shape (N, 3072) and N labels, "
            f"got {data.shape} and {len(labels)}"
        )
    return torch.from_numpy(data).reshape(-1, 3, 32, 32), labels


class OfficialSplitDataModule(ArrayDataModule):
    """An 8-bit dataset shipped as official train/test files under `<root>/<subdir>`.

    `download`: True downloads missing files, False never does, "auto" downloads only when the
    download host is reachable. Downloading happens in `prepare_data`, which Lightning runs on one
    process per node, and again on first use for callers outside a Trainer.
    """

    num_levels = 256
    dataset_name = ""
    subdir = ""
    required_files: tuple[str, ...] = ()
    download_url = ""

    def __init__(
        self, root: str = "data", download: bool | str = "auto", val_fraction: float = 0.1, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if download not in (True, False, "auto"):
            raise ValueError(f"download must be true, false or 'auto', got {download!r}")
        self.root = Path(root)
        self.download = download
        self.val_fraction = val_fraction

    @property
    def data_dir(self) -> Path:
        return self.root / self.subdir

    def fetch(self) -> None:
        """Download the official files into `root` (network required)."""
        raise NotImplementedError

    def read_official(self) -> dict[str, tuple[Tensor, Tensor]]:
        """The official "train" and "test" sets as uint8 images shaped `image_shape` and int64 labels."""
        raise NotImplementedError

    def how_to_get(self) -> str:
        """One or two sentences saying where to download the files by hand and where to unpack them."""
        raise NotImplementedError

    def missing_files(self) -> list[str]:
        return [name for name in self.required_files if not (self.data_dir / name).is_file()]

    def ensure_files(self) -> None:
        """Return once every required file is on disk (downloaded if allowed); else DatasetMissingError."""
        missing = self.missing_files()
        if not missing:
            return
        if self.download is True or (self.download == "auto" and network_available(self.download_url)):
            try:
                self.fetch()
            except (OSError, RuntimeError) as error:
                raise DatasetMissingError(
                    self.missing_message(missing, f"the download failed: {error}")
                ) from error
            missing = self.missing_files()
            if not missing:
                return
            reason = "the download did not produce them"
        elif self.download is False:
            reason = "download is off (data.download=false)"
        else:
            reason = f"no network to download them ({urlparse(self.download_url).hostname} unreachable)"
        raise DatasetMissingError(self.missing_message(missing, reason))

    def missing_message(self, missing: list[str], reason: str) -> str:
        return (
            f"{self.dataset_name} not found: {', '.join(missing)} missing from {self.data_dir.absolute()} "
            f"and not downloaded ({reason}). {self.how_to_get()} To read the data from another directory, "
            f"set data.root=/path/to/dir (the files then go under /path/to/dir/{self.subdir}/)."
        )

    def prepare_data(self) -> None:
        self.ensure_files()

    def labelled_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """train/val/test images in [−1, 1] with class labels (the labels train the metric classifier)."""
        self.ensure_files()
        official = self.read_official()
        images, labels = official["train"]
        index = split_indices(len(images), self.val_fraction, 0.0, self.split_seed)
        parts = {name: (images[index[name]], labels[index[name]]) for name in ("train", "val")}
        parts["test"] = official["test"]
        return {name: (levels_to_unit_range(x, self.num_levels), y) for name, (x, y) in parts.items()}

    def load_splits(self) -> dict[str, Tensor]:
        return {name: images for name, (images, _) in self.labelled_splits().items()}


class MNISTDataModule(OfficialSplitDataModule):
    """MNIST's 28×28 digits padded with −1 (level 0) to 32×32, so a U-Net can halve the size
    three times; read by torchvision from the idx files in `<root>/MNIST/raw/`."""

    image_shape = (1, 32, 32)
    dataset_name = "MNIST"
    subdir = "MNIST/raw"
    required_files = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    download_url = torchvision.datasets.MNIST.mirrors[0]

    def fetch(self) -> None:
        torchvision.datasets.MNIST(str(self.root), train=True, download=True)

    def read_official(self) -> dict[str, tuple[Tensor, Tensor]]:
        splits = {}
        for name, train in (("train", True), ("test", False)):
            dataset = torchvision.datasets.MNIST(str(self.root), train=train, download=False)
            splits[name] = (F.pad(dataset.data.unsqueeze(1), (2, 2, 2, 2), value=0), dataset.targets)
        return splits

    def how_to_get(self) -> str:
        return (
            f"Download {', '.join(f + '.gz' for f in self.required_files)} from {self.download_url} "
            f"and gunzip them into {self.data_dir.absolute()}, or run once with network access."
        )


class CIFAR10DataModule(OfficialSplitDataModule):
    """CIFAR-10's 32×32 colour images, read from the pickled batches in `<root>/cifar-10-batches-py/`.

    torchvision's CIFAR10 class verifies every file's MD5, so it rejects anything but the exact
    official files; the batches are read here instead and torchvision only downloads.
    """

    image_shape = (3, 32, 32)
    dataset_name = "CIFAR-10"
    subdir = torchvision.datasets.CIFAR10.base_folder
    train_batches = tuple(f"data_batch_{i}" for i in range(1, 6))
    required_files = (*train_batches, "test_batch")
    download_url = torchvision.datasets.CIFAR10.url

    def __init__(self, val_fraction: float = 0.02, **kwargs: Any) -> None:
        super().__init__(val_fraction=val_fraction, **kwargs)

    def fetch(self) -> None:
        archive = torchvision.datasets.CIFAR10
        download_and_extract_archive(
            archive.url, str(self.root), filename=archive.filename, md5=archive.tgz_md5
        )

    def read_official(self) -> dict[str, tuple[Tensor, Tensor]]:
        train = [read_cifar_batch(self.data_dir / name) for name in self.train_batches]
        return {
            "train": (torch.cat([x for x, _ in train]), torch.cat([y for _, y in train])),
            "test": read_cifar_batch(self.data_dir / "test_batch"),
        }

    def how_to_get(self) -> str:
        return (
            f"Download {self.download_url} and extract it into {self.root.absolute()} "
            f"(it unpacks to {self.subdir}/), or run once with network access."
        )
