"""What evaluation needs of DDP: which rank this is, how to gather rows in the one-process
order, and random streams that are independent per purpose and per rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from diffbench.seeding import Streams


def world() -> tuple[int, int]:
    """(rank, world size) of the process group DDP left behind, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(local: Tensor, total: int) -> Tensor:
    """Concatenate every rank's rows in rank order (rank r holds rows r, r + W, …) and restore
    the original order, so the gathered tensor is exactly what one process would have made."""
    rank, size = world()
    if size == 1:
        return local
    pieces: list[Tensor | None] = [None] * size
    dist.all_gather_object(pieces, local.cpu())
    out = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    for r, piece in enumerate(pieces):
        out[r::size] = piece
    return out


def generator_for(seed: int, purpose: str, device: torch.device) -> torch.Generator:
    """This rank's stream of one evaluation purpose (`seeding.EVALUATION_PURPOSES`) for the run's
    seed: independent across purposes and ranks."""
    return Streams(seed).evaluation(purpose, world()[0], device)
