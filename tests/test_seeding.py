"""The named random streams of a run are separate: no two purposes, indices or ranks share a
generator (numpy's SeedSequence alone reads (0, 1) and (0, 1, 0) as the same entropy)."""

from __future__ import annotations

import itertools

import torch

from diffbench.seeding import EVALUATION_PURPOSES, Streams, split_stream, stream_seed, validation_stream


def first_draws(generator: torch.Generator) -> tuple[float, ...]:
    return tuple(torch.rand(4, generator=generator, dtype=torch.float64).tolist())


def test_every_stream_of_a_run_is_its_own() -> None:
    streams = Streams(0)
    generators = {
        **{f"batches {i}": streams.batches(i) for i in range(4)},
        **{f"step {i} rank {r}": streams.step(i, r) for i in range(4) for r in range(2)},
        **{f"evaluation {p}": streams.evaluation(p) for p in EVALUATION_PURPOSES},
        **{f"evaluation {p} rank 1": streams.evaluation(p, 1) for p in EVALUATION_PURPOSES},
        **{f"split {i}": split_stream(0, i) for i in range(3)},
        **{f"validation {i}": validation_stream(i) for i in range(4)},
        **{f"other seed batches {i}": Streams(1).batches(i) for i in range(4)},
    }
    draws = {name: first_draws(g) for name, g in generators.items()}
    clashes = [(a, b) for a, b in itertools.combinations(draws, 2) if draws[a] == draws[b]]
    assert not clashes
    seeds = {streams.dropout_seed(i, r) for i in range(4) for r in range(2)}
    assert len(seeds) == 8


def test_trailing_zero_keys_make_another_stream() -> None:
    assert stream_seed(0, 1) != stream_seed(0, 1, 0) != stream_seed(0, 1, 0, 0)
    assert first_draws(Streams(3).step(5, 0)) == first_draws(Streams(3).step(5, 0))
