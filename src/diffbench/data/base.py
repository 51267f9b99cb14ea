"""A datamodule over in-memory image tensors in [−1, 1] with a train/val/test split fixed by its
own `split_seed` (the same for every run seed, so seeds vary initialisation and noise, never the
test images), and training batches that are a function of (seed, step) alone, so a resumed run
sees exactly the batches the uninterrupted run would have."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from diffbench.seeding import Streams


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """A permutation fixed by the seed, cut into train/val/test index sets."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test, n_val = round(n * test_fraction), round(n * val_fraction)
    return {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}


def levels_to_unit_range(values: Tensor, num_levels: int) -> Tensor:
    """Integers 0..L−1 → evenly spaced floats in [−1, 1]."""
    return values.float() / (num_levels - 1) * 2 - 1


class StepBatches(Dataset):
    """Item i is the batch of global step index `first + i`, made by `make(index)` from nothing but
    that index. Under DDP Lightning deals the items out in turn (process r of W takes r, r + W, …),
    so global index step·W + r is process r's batch at `step`; a run resumed at step s starts at
    first = s·W. The length stays the full run's so Lightning's epoch arithmetic is unchanged:
    training stops at max_steps before the surplus items at the end are reached."""

    def __init__(self, make: Callable[[int], Tensor], num_batches: int, first: int = 0) -> None:
        self.make = make
        self.num_batches = num_batches
        self.first = first

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[Tensor]:
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of {self.num_batches}")
        return (self.make(self.first + index),)


class ShuffledEpochs:
    """Batch k of back-to-back shuffles of `data`: epoch e = k // M (M = full batches per epoch)
    is a permutation seeded by (seed, e), and batch k is its (k mod M)-th slice."""

    def __init__(self, data: Tensor, batch_size: int, seed: int) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = max(1, len(data) // batch_size)
        self._epoch: tuple[int, Tensor] | None = None

    def permutation(self, epoch: int) -> Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, torch.randperm(len(self.data), generator=Streams(self.seed).batches(epoch)))
        return self._epoch[1]

    def __call__(self, index: int) -> Tensor:
        epoch, slot = divmod(index, self.per_epoch)
        return self.data[self.permutation(epoch)[slot * self.batch_size : (slot + 1) * self.batch_size]]


class ArrayDataModule(L.LightningDataModule):
    """Holds the three splits as tensors; subclasses fill them in `load_splits`."""

    num_levels: int | None = None
    image_shape: tuple[int, int, int] = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        """The run's seed: the order of training batches."""
        self.split_seed = split_seed
        """Which images are train, val and test: the same for every run seed."""
        self.splits: dict[str, Tensor] = {}
        self.train_samples: int | None = None
        self.resume_step = 0
        """The step a resumed run continues from: its first batch is that step's."""

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

    def batch_maker(self) -> Callable[[int], Tensor]:
        """Global batch index → that batch: back-to-back seeded shuffles of the train split."""
        return ShuffledEpochs(self.split("train"), self.batch_size, self.seed)

    def train_dataloader(self) -> DataLoader:
        """One long epoch of `train_samples / batch_size` steps (StepBatches), so step-based
        training shows one progress bar and validation falls on exact step counts."""
        num_steps = -(-(self.train_samples or len(self.split("train"))) // self.batch_size)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        batches = StepBatches(self.batch_maker(), num_steps * world_size, self.resume_step * world_size)
        return DataLoader(
            batches,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
