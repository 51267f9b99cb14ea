"""Random streams keyed by what they are for, so every draw of a run takes a generator that depends
on nothing but the run's seed and the stream's name (and a step, batch or process index): a batch
or a training step draws the same numbers whenever it runs — in one go, resumed after a crash, or in
another worker — and no code path reads torch's global generator. Keys are mixed by NumPy's
SeedSequence, never added or multiplied, so nearby keys (step 7 and step 8, seed 1 and purpose 2)
give unrelated streams."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

EVALUATION_PURPOSES = (
    "vlb",
    "ode",
    "samples",
    "eps_profile",
    "trajectory",
    "groundtruth",
    "budget",
    "sample_grid",
)
"""The named streams of evaluation: each a separate, reproducible source of noise."""


def stream_seed(*keys: int) -> int:
    """One 64-bit seed from the keys, through SeedSequence. The number of keys goes in first:
    SeedSequence alone reads (0, 1) and (0, 1, 0) as one entropy, which would merge streams."""
    return int(np.random.SeedSequence([len(keys), *(int(k) for k in keys)]).generate_state(1, np.uint64)[0])


def stream(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded by `stream_seed(*keys)`."""
    return torch.Generator(device=device).manual_seed(stream_seed(*keys))


def name_key(name: str) -> int:
    """A stable 63-bit integer for a stream's name (the same in every process and Python version)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


VALIDATION, EVALUATION, BATCHES, STEPS, DROPOUT, SPLIT = (
    name_key(name) for name in ("validation", "evaluation", "batches", "steps", "dropout", "split")
)


@dataclass(frozen=True)
class Streams:
    """The named random streams of a run with seed `seed`."""

    seed: int

    def batches(self, index: int) -> torch.Generator:
        """The training data's stream `index` (a shuffle's epoch, or a fresh draw's batch)."""
        return stream(self.seed, BATCHES, index)

    def step(self, step: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
        """Training step `step` on process `rank`: its t and ε."""
        return stream(self.seed, STEPS, step, rank, device=device)

    def dropout_seed(self, step: int, rank: int) -> int:
        """The seed of step `step`'s dropout masks on process `rank` (computed on the host)."""
        return stream_seed(self.seed, DROPOUT, step, rank)

    def evaluation(self, purpose: str, rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
        """The stream of one evaluation purpose (EVALUATION_PURPOSES) on process `rank`."""
        if purpose not in EVALUATION_PURPOSES:
            raise ValueError(
                f"unknown evaluation stream {purpose!r}; streams: {', '.join(EVALUATION_PURPOSES)}"
            )
        return stream(self.seed, EVALUATION, name_key(purpose), rank, device=device)


def split_stream(split_seed: int, index: int) -> torch.Generator:
    """The draw of data split `index` (train, val, test) of a dataset sampled rather than stored."""
    return stream(split_seed, SPLIT, index)


def validation_stream(batch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Validation batch `batch`'s t and ε: the same for every seed, arm and pass, so validation
    curves differ only by the networks."""
    return stream(VALIDATION, batch, device=device)
