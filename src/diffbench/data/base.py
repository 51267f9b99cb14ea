"""A datamodule over in-memory image tensors in [−1, 1] with a seeded train/val/test split."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, TensorDataset


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """A permutation fixed by the seed, cut into train/val/test index sets."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    return {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}


def levels_to_unit_range(values: Tensor, num_levels: int) -> Tensor:
    """Integers 0..L−1 → evenly spaced floats in [−1, 1]."""
    return values.float() / (num_levels - 1) * 2 - 1


class ArrayDataModule(L.LightningDataModule):
    """Holds the three splits as tensors; subclasses fill them in `load_splits`."""

    num_levels: int | None = None
    image_shape: tuple[int, int, int] = (1, 8, 8)

    def __init__(
        self, batch_size: int = 128, eval_batch_size: int = 512, num_workers: int = 0, seed: int = 0
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.splits: dict[str, Tensor] = {}
        self.train_samples: int | None = None

    def load_splits(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = self.load_splits()

    def split(self, name: str) -> Tensor:
        self.setup()
        return self.splits[name]

    def _loader(self, name: str) -> DataLoader:
        return DataLoader(
            TensorDataset(self.split(name)),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """One long epoch of `train_samples` draws (back-to-back shuffles), so step-based
        training shows one progress bar and validation falls on exact step counts."""
        data = TensorDataset(self.split("train"))
        generator = torch.Generator().manual_seed(self.seed)
        sampler = RandomSampler(data, num_samples=self.train_samples or len(data), generator=generator)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=len(data) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
