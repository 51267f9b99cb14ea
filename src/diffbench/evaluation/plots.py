"""The evaluation's pictures: enlarged image grids and per-t curves, written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from diffbench import atomic  # noqa: E402
from diffbench.rundir import Curve  # noqa: E402


def save_grid(images: Tensor, path: Path, nrow: int) -> None:
    """An image grid, small images enlarged (nearest neighbour) so 8×8 digits are legible."""
    scale = max(1, 32 // images.shape[-1])
    images = F.interpolate(images.clamp(-1, 1).float(), scale_factor=scale, mode="nearest")
    atomic.save_with(
        path,
        lambda tmp: save_image(
            images, tmp, format="png", nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0
        ),
    )


def plot_curve(x: Tensor, y: Tensor, path: Path, curve: Curve, logy: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x.cpu().numpy(), y.cpu().numpy())
    ax.set(xlabel=curve.columns[0], ylabel=curve.ylabel, title=curve.title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic.save_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
