"""Random streams keyed by what they are for — (seed, batch index) or (seed, step, process) —
so a batch or a training step draws the same numbers whenever it runs: in one go, resumed
after a crash, or in another worker."""

from __future__ import annotations

import numpy as np
import torch


def stream_seed(*keys: int) -> int:
    """One 64-bit seed from the keys. SeedSequence mixes them, so nearby keys (step 7 and
    step 8) give unrelated streams, unlike seed + step."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def stream(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded by `stream_seed(*keys)`."""
    return torch.Generator(device=device).manual_seed(stream_seed(*keys))
