"""Tests never talk to W&B servers and never touch the user's cache."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from diffbench.config import compose
from diffbench.data.digits import DigitsDataModule
from diffbench.data.gmm import DiffusedMixture, fit_digits_mixture
from diffbench.spec import RunSpec, build_spec
from diffbench.train.build import THREADS_ENV


def pytest_configure(config: pytest.Config) -> None:
    """A pytest-xdist worker (`make test` runs two) gets one core: one torch thread, inherited by
    every run a test starts ($DIFFBENCH_THREADS), unless the caller chose otherwise."""
    if hasattr(config, "workerinput"):
        os.environ.setdefault(THREADS_ENV, "1")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ[THREADS_ENV]))


def isolate(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """W&B offline and silent, the cache in the session's temporary folder, no inherited run dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("DIFFBENCH_RUN_DIR", raising=False)


@pytest.fixture(autouse=True)
def offline_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    isolate(monkeypatch, tmp_path_factory)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """For tests of thousands of tiny ops: a second intra-op thread only adds synchronisation,
    which slows them tenfold on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = [
    "profile=smoke",
    "trainer.max_steps=2",
    "eval.vlb_timesteps=5",
    "eval.num_samples=8",
    "eval.ode_images=4",
    "eval.num_images=16",
    "trainer.val_check_interval=2",
    "run.checkpoint_every=2",
    "trainer.log_every_n_steps=1",
    "diffusion.num_timesteps=20",
    "sample.num_images=4",
    "model.base_channels=16",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[4]",
]


def spec_of(args: list[str]) -> RunSpec:
    """The run spec of a command line, as `python -m diffbench.run` builds it."""
    return build_spec(compose(args))


@pytest.fixture(scope="session")
def digits() -> DigitsDataModule:
    """The default dataset with the default split, loaded once for the session."""
    return DigitsDataModule()


@pytest.fixture(scope="session")
def digits_mixture(tmp_path_factory: pytest.TempPathFactory) -> DiffusedMixture:
    """The default fitted mixture, fitted into the session's test cache (session scope runs before
    the autouse fixture that isolates the test, so it isolates itself)."""
    with pytest.MonkeyPatch.context() as patch:
        isolate(patch, tmp_path_factory)
        return fit_digits_mixture()
