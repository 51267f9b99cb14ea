"""scikit-learn's 1,797 handwritten 8×8 digits: 17 grey levels, shipped with the package."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import Tensor

from diffbench.data.base import ArrayDataModule, levels_to_unit_range, split_indices


def digits_images() -> tuple[Tensor, Tensor]:
    """All images as (N, 1, 8, 8) floats in [−1, 1] and their labels."""
    bunch = load_digits()
    images = torch.from_numpy(bunch.images).round().long().unsqueeze(1)
    return levels_to_unit_range(images, DigitsDataModule.num_levels), torch.from_numpy(bunch.target)


class DigitsDataModule(ArrayDataModule):
    """Embedded default dataset: no network needed; a 70/10/20 split fixed by `split_seed`."""

    num_levels = 17
    image_shape = (1, 8, 8)

    def __init__(self, val_fraction: float = 0.1, test_fraction: float = 0.2, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def load_splits(self) -> dict[str, Tensor]:
        images, _ = digits_images()
        index = split_indices(len(images), self.val_fraction, self.test_fraction, self.split_seed)
        return {name: images[idx] for name, idx in index.items()}
