"""The gmm ground truth: the diffused mixture's density, score and ε* against independent computations,
the fitted mixture's caching, the datamodule's splits and the metrics built on them."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits
from torch import Tensor
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal
from torch.utils.data import DistributedSampler

from diffbench.core.diffusion import NoiseSchedule
from diffbench.data import gmm
from diffbench.data.digits import digits_images
from diffbench.data.gmm import DiffusedMixture, GMMDataModule, fit_digits_mixture
from diffbench.evaluation.groundtruth import eps_star_distance, exact_nll_bpd, sample_log_density_bpd
from diffbench.sampling.samplers import EpsFn

ALPHA_BARS = [1.0, 0.9, 0.3, 1e-3, 1e-9]


@pytest.fixture
def small_mixture() -> DiffusedMixture:
    """Three well-separated, strongly correlated components in 6-D: every term of the formulas matters."""
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(3, 6, 6, generator=generator, dtype=torch.float64)
    covariances = factors @ factors.transpose(1, 2) / 6 + 0.05 * torch.eye(6, dtype=torch.float64)
    means = 2 * torch.randn(3, 6, generator=generator, dtype=torch.float64)
    return DiffusedMixture(torch.tensor([0.5, 0.3, 0.2]), means, covariances)


def diffused_reference(mixture: DiffusedMixture, alpha_bar: float) -> MixtureSameFamily:
    """q_t built directly by torch.distributions, with no eigendecomposition."""
    identity = torch.eye(mixture.dim, dtype=torch.float64)
    components = MultivariateNormal(
        math.sqrt(alpha_bar) * mixture.means, alpha_bar * mixture.covariances + (1 - alpha_bar) * identity
    )
    return MixtureSameFamily(Categorical(mixture.weights), components)


@pytest.mark.parametrize("alpha_bar", ALPHA_BARS)
def test_log_prob_matches_torch_distributions(small_mixture: DiffusedMixture, alpha_bar: float) -> None:
    x = 2 * torch.randn(50, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = diffused_reference(small_mixture, alpha_bar).log_prob(x)
    torch.testing.assert_close(small_mixture.log_prob(x, alpha_bar), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        small_mixture.log_prob(x, torch.tensor(alpha_bar, dtype=torch.float64)),
        expected,
        rtol=1e-10,
        atol=1e-10,
    )


def test_log_prob_takes_one_alpha_bar_per_row_and_image_shapes(digits_mixture: DiffusedMixture) -> None:
    x = torch.randn(len(ALPHA_BARS), 1, 8, 8, generator=torch.Generator().manual_seed(2))
    rowwise = digits_mixture.log_prob(x, torch.tensor(ALPHA_BARS, dtype=torch.float64))
    one_by_one = torch.stack([digits_mixture.log_prob(x[i : i + 1], a)[0] for i, a in enumerate(ALPHA_BARS)])
    assert rowwise.shape == (len(ALPHA_BARS),) and rowwise.dtype == torch.float64
    torch.testing.assert_close(rowwise, one_by_one)
    expected = diffused_reference(digits_mixture, ALPHA_BARS[2]).log_prob(x.reshape(-1, 64).double())
    torch.testing.assert_close(digits_mixture.log_prob(x, ALPHA_BARS[2]), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("alpha_bar", ALPHA_BARS)
def test_score_is_the_gradient_of_log_prob(small_mixture: DiffusedMixture, alpha_bar: float) -> None:
    x = 2 * torch.randn(40, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x.requires_grad_(True)
    (autograd,) = torch.autograd.grad(small_mixture.log_prob(x, alpha_bar).sum(), x)
    torch.testing.assert_close(small_mixture.score(x.detach(), alpha_bar), autograd, rtol=1e-9, atol=1e-9)


def test_score_keeps_image_shape_with_rowwise_alpha_bar(digits_mixture: DiffusedMixture) -> None:
    x = torch.randn(len(ALPHA_BARS), 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x.requires_grad_(True)
    alpha_bar = torch.tensor(ALPHA_BARS, dtype=torch.float64)
    (autograd,) = torch.autograd.grad(digits_mixture.log_prob(x, alpha_bar).sum(), x)
    score = digits_mixture.score(x.detach(), alpha_bar)
    assert score.shape == x.shape
    torch.testing.assert_close(score, autograd, rtol=1e-8, atol=1e-8)


def test_eps_star_is_the_noise_itself_in_the_pure_noise_limit(digits_mixture: DiffusedMixture) -> None:
    """With ᾱ → 0, q_t → N(0, I), whose score is −x, so ε* = −√(1 − ᾱ)·(−x) → x."""
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(digits_mixture.eps_star(x, 1e-10), x, rtol=0, atol=1e-4)


def test_eps_star_is_minus_scaled_score(small_mixture: DiffusedMixture) -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    alpha_bar = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    expected = -(1 - alpha_bar).sqrt()[:, None] * small_mixture.score(x, alpha_bar)
    torch.testing.assert_close(small_mixture.eps_star(x, alpha_bar), expected)


def test_samples_match_the_mixture_moments(digits_mixture: DiffusedMixture) -> None:
    n = 40000
    samples = digits_mixture.sample(n, torch.Generator().manual_seed(7))
    assert samples.shape == (n, 64) and samples.dtype == torch.float64
    variances = digits_mixture.covariance().diagonal()
    standard_error = (variances / n).sqrt()
    assert ((samples.mean(0) - digits_mixture.mean()).abs() < 5 * standard_error).all()
    # A Gaussian's covariance entries have sampling error ≤ √(2 Var_i Var_j / n); allow for heavier tails.
    bound = 6 * (2 * variances[:, None] * variances[None, :] / n).sqrt()
    assert ((samples.T.cov() - digits_mixture.covariance()).abs() < bound).all()


def test_mixture_moments_by_the_law_of_total_covariance(small_mixture: DiffusedMixture) -> None:
    """Against the moment formulas spelled out the long way, component by component."""
    second_moment = sum(
        w * (c + torch.outer(m, m))
        for w, m, c in zip(small_mixture.weights, small_mixture.means, small_mixture.covariances, strict=True)
    )
    mean = sum(w * m for w, m in zip(small_mixture.weights, small_mixture.means, strict=True))
    torch.testing.assert_close(small_mixture.mean(), mean)
    torch.testing.assert_close(small_mixture.covariance(), second_moment - torch.outer(mean, mean))


def test_fit_is_cached_and_reloads_the_same_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIFFBENCH_CACHE", str(tmp_path))
    first = fit_digits_mixture(num_components=4, seed=1)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def no_refit(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached mixture was fitted again")

    monkeypatch.setattr(GaussianMixture, "fit", no_refit)
    second = fit_digits_mixture(num_components=4, seed=1)
    for name in ("weights", "means", "covariances"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_exact_nll_matches_sklearn_score_samples(digits_mixture: DiffusedMixture) -> None:
    """The same fit done directly in scikit-learn gives the same density, converted to bits/dim."""
    images = digits_images()[0].reshape(-1, 64).double().numpy()
    with threadpool_limits(limits=1):
        reference = GaussianMixture(n_components=20, covariance_type="full", reg_covar=1e-2, random_state=0)
        reference.fit(images)
    points = digits_mixture.sample(500, torch.Generator().manual_seed(8))
    expected = -torch.from_numpy(reference.score_samples(points.numpy())) / (64 * math.log(2))
    torch.testing.assert_close(exact_nll_bpd(digits_mixture, points), expected, rtol=1e-9, atol=1e-9)
    assert sample_log_density_bpd(digits_mixture, points) == pytest.approx(expected.mean().item(), rel=1e-9)


@pytest.mark.parametrize("covariance_type", ["tied", "diag", "spherical"])
def test_every_sklearn_covariance_type_gives_its_density(covariance_type: str) -> None:
    images = digits_images()[0].reshape(-1, 64).double().numpy()
    with threadpool_limits(limits=1):
        reference = GaussianMixture(3, covariance_type=covariance_type, reg_covar=1e-2, random_state=0).fit(
            images
        )
    mixture = fit_digits_mixture(num_components=3, covariance_type=covariance_type, seed=0)
    expected = -torch.from_numpy(reference.score_samples(images[:100])) / (64 * math.log(2))
    torch.testing.assert_close(exact_nll_bpd(mixture, torch.from_numpy(images[:100])), expected)


def test_datamodule_splits_are_float_images_fixed_by_the_split_seed() -> None:
    """The samples of each split follow data.split_seed, not the run's seed: every run seed is
    judged on the same test samples."""
    sizes = {"num_train": 300, "num_val": 50, "num_test": 60}
    datamodule = GMMDataModule(**sizes, seed=3, split_seed=1)
    assert datamodule.num_levels is None and datamodule.image_shape == (1, 8, 8)
    assert isinstance(datamodule.mixture, DiffusedMixture)
    for name, size in zip(("train", "val", "test"), sizes.values(), strict=True):
        split = datamodule.split(name)
        assert split.shape == (size, 1, 8, 8) and split.dtype == torch.float32
    other_run = GMMDataModule(**sizes, seed=4, split_seed=1)
    other_split = GMMDataModule(**sizes, seed=3, split_seed=2)
    for name in ("train", "val", "test"):
        assert torch.equal(datamodule.split(name), other_run.split(name))
        assert not torch.equal(datamodule.split(name), other_split.split(name))
    assert not torch.equal(datamodule.split("val")[:50], datamodule.split("test")[:50])
    (batch,) = next(iter(datamodule.train_dataloader()))
    assert batch.shape == (datamodule.batch_size, 1, 8, 8)


def train_batches(datamodule: GMMDataModule, steps: int) -> list[Tensor]:
    """The training loader's batches for a run of `steps` steps, as the run command sets it up."""
    datamodule.train_samples = steps * datamodule.batch_size
    return [batch for (batch,) in datamodule.train_dataloader()]


def test_fresh_batches_are_new_draws_and_a_rerun_repeats_them() -> None:
    sizes = {"num_train": 64, "num_val": 16, "num_test": 16, "batch_size": 32}
    batches = train_batches(GMMDataModule(**sizes, seed=5), steps=7)
    assert len(batches) == 7
    assert all(b.shape == (32, 1, 8, 8) and b.dtype == torch.float32 for b in batches)
    rerun = train_batches(GMMDataModule(**sizes, seed=5), steps=7)
    assert all(torch.equal(a, b) for a, b in zip(batches, rerun, strict=True))
    rows = torch.cat(batches).flatten(1)
    assert len(rows.unique(dim=0)) == len(rows), "no sample is drawn twice"
    train_split = GMMDataModule(**sizes, seed=5).split("train").flatten(1)
    assert not (rows[:, None] == train_split[None]).all(-1).any(), "fresh batches do not reuse the split"
    other_seed = train_batches(GMMDataModule(**sizes, seed=6), steps=7)
    assert not any(torch.equal(a, b) for a, b in zip(batches, other_seed, strict=True))


def test_fixed_samples_cycle_over_the_train_split() -> None:
    datamodule = GMMDataModule(num_train=64, num_val=16, num_test=16, batch_size=32, fresh_samples=False)
    rows = torch.cat(train_batches(datamodule, steps=6)).flatten(1)
    assert rows.shape == (6 * 32, 64)
    train_split = datamodule.split("train").flatten(1)
    assert (rows[:, None] == train_split[None]).all(-1).any(1).all(), "every row comes from the split"
    assert len(rows.unique(dim=0)) == 64, "three passes over the 64 training samples"


def test_ddp_processes_get_their_own_fresh_batches() -> None:
    """Lightning deals a map-style dataset out with DistributedSampler(shuffle=False): each of two
    processes must get all its steps' batches, none shared with the other process."""
    datamodule = GMMDataModule(num_train=64, num_val=16, num_test=16, batch_size=16, seed=1)
    datamodule.train_samples = 5 * datamodule.batch_size
    datamodule.trainer = SimpleNamespace(world_size=2)
    dataset = datamodule.train_dataloader().dataset
    dealt = [list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=False)) for r in range(2)]
    assert [len(indices) for indices in dealt] == [5, 5]
    assert not set(dealt[0]) & set(dealt[1])


def test_fresh_samples_match_the_mixture_moments() -> None:
    datamodule = GMMDataModule(num_train=64, num_val=16, num_test=16, batch_size=1000, seed=2)
    samples = torch.cat(train_batches(datamodule, steps=40)).flatten(1).double()
    n = len(samples)
    mixture = datamodule.mixture
    variances = mixture.covariance().diagonal()
    assert ((samples.mean(0) - mixture.mean()).abs() < 5 * (variances / n).sqrt()).all()
    # A Gaussian's covariance entries have sampling error ≤ √(2 Var_i Var_j / n); allow for heavier tails.
    bound = 6 * (2 * variances[:, None] * variances[None, :] / n).sqrt()
    assert ((samples.T.cov() - mixture.covariance()).abs() < bound).all()


def exact_eps_fn(mixture: DiffusedMixture, schedule: NoiseSchedule) -> EpsFn:
    """A 'model' that is the optimum itself."""

    def eps_fn(xt: Tensor, t: Tensor) -> Tensor:
        return mixture.eps_star(xt, schedule.alphas_cumprod[t]).float()

    return eps_fn


def test_eps_star_distance_of_the_optimum_is_zero(digits_mixture: DiffusedMixture) -> None:
    schedule = NoiseSchedule("linear", 1000)
    x0 = digits_mixture.sample(64, torch.Generator().manual_seed(9)).float().reshape(64, 1, 8, 8)
    timesteps = torch.tensor([1, 10, 100, 500, 999, 1000])
    distance = eps_star_distance(
        exact_eps_fn(digits_mixture, schedule),
        digits_mixture,
        schedule,
        x0,
        timesteps,
        torch.Generator().manual_seed(0),
        max_batch=128,
    )
    assert distance.shape == (len(timesteps),) and distance.dtype == torch.float64
    assert (distance < 1e-10).all()


def test_eps_star_distance_of_a_zero_predictor_is_the_size_of_eps_star(
    digits_mixture: DiffusedMixture,
) -> None:
    """With ε̂ = 0 the distance is mean ‖ε*(x_t)‖²/D over the very x_t the predictor was shown;
    those x_t must be draws from q(x_t | x0) at the right t."""
    schedule = NoiseSchedule("linear", 1000)
    batch = 256
    x0 = digits_mixture.sample(batch, torch.Generator().manual_seed(10)).float().reshape(batch, 1, 8, 8)
    timesteps = torch.tensor([5, 300, 900])
    seen: list[tuple[Tensor, Tensor]] = []

    def zero_eps_fn(xt: Tensor, t: Tensor) -> Tensor:
        assert xt.dtype == torch.float32 and xt.shape[1:] == (1, 8, 8) and t.dtype == torch.long
        seen.append((xt, t))
        return torch.zeros_like(xt)

    distance = eps_star_distance(
        zero_eps_fn, digits_mixture, schedule, x0, timesteps, torch.Generator().manual_seed(0), max_batch=512
    )
    assert len(seen) == 2  # two timesteps fit in one call, the third needs another
    xt, t = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
    assert torch.equal(t, timesteps.repeat_interleave(batch))
    alpha_bar = schedule.alphas_cumprod[t]
    expected = digits_mixture.eps_star(xt, alpha_bar).pow(2).sum((1, 2, 3)).div(64).reshape(3, batch).mean(1)
    torch.testing.assert_close(distance, expected)
    implied_noise = (xt.double() - alpha_bar.sqrt()[:, None, None, None] * x0.double().repeat(3, 1, 1, 1)) / (
        1 - alpha_bar
    ).sqrt()[:, None, None, None]
    assert implied_noise.mean().abs() < 0.02 and (implied_noise.std() - 1).abs() < 0.02


def test_evaluation_in_row_chunks_changes_nothing(
    small_mixture: DiffusedMixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    alpha_bar = torch.rand(30, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    whole = small_mixture.log_prob(x, alpha_bar), small_mixture.eps_star(x, alpha_bar)
    monkeypatch.setattr(gmm, "ROWS_PER_CHUNK", 7)
    chunked = small_mixture.log_prob(x, alpha_bar), small_mixture.eps_star(x, alpha_bar)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
