"""MNIST and CIFAR-10 datamodules on small files written in the real on-disk formats, offline."""

from __future__ import annotations

import pickle
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import diffbench.data.vision as vision
from diffbench.data.vision import CIFAR10DataModule, DatasetMissingError, MNISTDataModule
from diffbench.evaluation.fidelity import sample_quality

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach the network fails the test, so nothing can be downloaded by accident."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a test tried to use the network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx ubyte format of LeCun's MNIST files: magic 0x0000 08 <ndim>, big-endian int32 sizes, bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(
    root: Path, num_train: int, num_test: int, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random 28×28 images with a legible class (a bright row set by the label), in torchvision's layout."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", num_train), ("t10k", num_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
        images[np.arange(n), 4 + 2 * labels] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar(root: Path, per_batch: int, num_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Protocol-2 pickled dicts with the official keys; 'data' is (N, 3072) uint8: R, G, then B planes."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in CIFAR_FILES:
        n = num_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        batch = {
            "batch_label": f"{name} of 1",
            "labels": rng.integers(0, 10, n).tolist(),
            "data": data,
            "filenames": [f"image_{i}.png" for i in range(n)],
        }
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file, protocol=2)
        written[name] = data
    return written


def test_mnist_reads_idx_files_pads_and_splits(tmp_path: Path) -> None:
    arrays = write_mnist(tmp_path, num_train=20, num_test=10)
    dm = MNISTDataModule(root=str(tmp_path), download=False, val_fraction=0.2, split_seed=1)
    splits = dm.labelled_splits()
    assert dm.image_shape == (1, 32, 32) and dm.num_levels == 256
    assert {name: tuple(x.shape) for name, (x, _) in splits.items()} == {
        "train": (16, 1, 32, 32),
        "val": (4, 1, 32, 32),
        "test": (10, 1, 32, 32),
    }
    test_images, test_labels = splits["test"]
    # The official test set, in order: 28×28 pixels p ↦ p/255·2 − 1 inside a 2-pixel border of −1.
    expected = torch.from_numpy(arrays["t10k"][0]).float() / 255 * 2 - 1
    torch.testing.assert_close(test_images[:, 0, 2:30, 2:30], expected)
    assert torch.equal(test_labels, torch.from_numpy(arrays["t10k"][1]).long())
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (test_images[:, 0, border] == -1).all()
    for images, _ in splits.values():
        levels = (images + 1) / 2 * 255
        assert images.min() >= -1 and images.max() <= 1
        torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)
    # Train and val partition the official training set; the split seed fixes which image goes where.
    carved = torch.cat([splits["train"][0], splits["val"][0]])[:, 0, 2:30, 2:30]
    official = torch.from_numpy(arrays["train"][0]).float() / 255 * 2 - 1
    assert sorted(x.tobytes() for x in carved.numpy()) == sorted(x.tobytes() for x in official.numpy())
    assert torch.equal(dm.split("val"), splits["val"][0])
    other_split = MNISTDataModule(root=str(tmp_path), download=False, val_fraction=0.2, split_seed=2)
    other_run = MNISTDataModule(root=str(tmp_path), download=False, val_fraction=0.2, split_seed=1, seed=5)
    assert not torch.equal(other_split.split("val"), dm.split("val"))
    assert torch.equal(other_run.split("val"), dm.split("val"))


def test_cifar10_reads_pickle_batches(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, per_batch=4, num_test=6)
    dm = CIFAR10DataModule(root=str(tmp_path), download=False, val_fraction=0.25, seed=0, batch_size=5)
    assert dm.image_shape == (3, 32, 32) and dm.num_levels == 256
    assert {name: tuple(dm.split(name).shape) for name in ("train", "val", "test")} == {
        "train": (15, 3, 32, 32),
        "val": (5, 3, 32, 32),
        "test": (6, 3, 32, 32),
    }
    test = dm.split("test")
    # Pixel (row 7, column 11) of the green plane: offset 1024 + 32·7 + 11 in the official row layout.
    assert torch.equal(
        ((test[:, 1, 7, 11] + 1) / 2 * 255).round().byte(), torch.from_numpy(written["test_batch"][:, 1259])
    )
    assert test.min() >= -1 and test.max() <= 1
    batch = next(iter(dm.train_dataloader()))[0]
    assert batch.shape == (5, 3, 32, 32) and batch.dtype == torch.float32


@pytest.mark.parametrize(
    ("module", "files", "layout", "source"),
    [
        (MNISTDataModule, MNIST_FILES, "MNIST/raw", "ossci-datasets.s3.amazonaws.com/mnist"),
        (CIFAR10DataModule, CIFAR_FILES, "cifar-10-batches-py", "cifar-10-python.tar.gz"),
    ],
)
def test_missing_files_say_what_to_put_where(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: type,
    files: tuple[str, ...],
    layout: str,
    source: str,
) -> None:
    with pytest.raises(DatasetMissingError) as error:
        module(root=str(tmp_path / "nowhere"), download=False).setup()
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert all(name in message for name in files)
    assert str((tmp_path / "nowhere" / layout).absolute()) in message
    assert source in message and "data.root" in message and "download is off" in message

    # "auto" offline neither downloads nor hangs: the same error, saying why.
    monkeypatch.setattr(vision, "network_available", lambda url: False)
    monkeypatch.setattr(module, "fetch", lambda self: pytest.fail("fetch called offline"))
    with pytest.raises(DatasetMissingError, match="no network"):
        module(root=str(tmp_path / "nowhere"), download="auto").setup()


def test_partly_missing_cifar_names_only_the_missing_file(tmp_path: Path) -> None:
    write_cifar(tmp_path, per_batch=2, num_test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetMissingError, match="data_batch_3 missing") as error:
        CIFAR10DataModule(root=str(tmp_path), download=False).setup()
    assert "data_batch_1" not in str(error.value)


def test_download_must_be_a_known_mode() -> None:
    with pytest.raises(ValueError, match="auto"):
        MNISTDataModule(download="sometimes")


def test_mnist_metrics_come_from_the_mnist_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path / "cache"))
    write_mnist(tmp_path, num_train=300, num_test=60)
    real = MNISTDataModule(root=str(tmp_path), download=False).split("test")
    same = sample_quality(real, real, "mnist", num_levels=256, data_root=str(tmp_path))
    noise = sample_quality(
        torch.rand_like(real) * 2 - 1, real, "mnist", num_levels=256, data_root=str(tmp_path)
    )
    assert same["feature_extractor"] == "mnist-classifier" and same["num_samples"] == 60
    assert {"fd_mnist", "kid_mnist", "precision_mnist", "recall_mnist"} <= set(same)
    assert abs(same["fd_mnist"]) < 1e-3 < noise["fd_mnist"]
