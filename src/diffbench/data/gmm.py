"""The `gmm` dataset: a Gaussian mixture fitted once to the digits, whose every diffused marginal is known.

Because q(x_t | x0) is Gaussian, diffusing a mixture of Gaussians gives again a mixture:
q_t = Σ_k π_k N(√ᾱ_t μ_k, ᾱ_t Σ_k + (1 − ᾱ_t) I). So the exact density, score and optimal
ε-prediction are available at every t, which turns "how close is the model to the truth" from
an estimate into a measurement (shared/DESIGN.md, "Ground truth where theory gives it").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits
from torch import Tensor

from diffbench import atomic
from diffbench.data.base import ArrayDataModule
from diffbench.data.digits import digits_images
from diffbench.seeding import Streams, split_stream

# Rows evaluated together: bounds the (rows, K, D) float64 intermediates (≈ 20 MB each at K = 20, D = 64).
ROWS_PER_CHUNK = 2048


def row_chunks(x: Tensor, alpha_bar: Tensor) -> zip[tuple[Tensor, Tensor]]:
    """Matching slices of at most ROWS_PER_CHUNK rows of x and of its per-row ᾱ."""
    return zip(x.split(ROWS_PER_CHUNK), alpha_bar.split(ROWS_PER_CHUNK), strict=True)


class DiffusedMixture:
    """A Gaussian mixture over flat D-dimensional vectors and all its diffused marginals q_t.

    Every Σ_k is eigendecomposed once, Σ_k = U_k diag(λ_k) U_kᵀ. The diffused covariance
    ᾱΣ_k + (1 − ᾱ)I shares the eigenvectors and has eigenvalues ᾱλ_k + (1 − ᾱ), so a density or
    score at any ᾱ (even a different ᾱ per row) costs one projection onto the eigenbases and no
    new factorisation. Everything is computed in float64: at small t the component densities
    are sharp and float32 loses the differences between them.

    Methods accept x as (B, D) or as images (B, C, H, W) with C·H·W = D, and ᾱ as a scalar or one
    value per row; results are float64 on the device of x, vector results shaped like x.
    """

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        # Renormalised so that weights rounded on the way in (float32, a saved file) still give a density.
        self.weights = weights.double() / weights.double().sum()
        self.means = means.double()
        self.covariances = covariances.double()
        self.num_components, self.dim = self.means.shape
        if self.weights.shape != (self.num_components,):
            raise ValueError(f"weights must have shape ({self.num_components},), got {tuple(weights.shape)}")
        if self.covariances.shape != (self.num_components, self.dim, self.dim):
            raise ValueError(
                f"covariances must have shape ({self.num_components}, {self.dim}, {self.dim}), "
                f"got {tuple(covariances.shape)}"
            )
        symmetric = (self.covariances + self.covariances.transpose(1, 2)) / 2
        # Single-threaded: LAPACK's threads on 64×64 matrices only spin, up to 500× slower on 2 busy cores.
        with threadpool_limits(limits=1):
            self.eigenvalues, self.eigenvectors = torch.linalg.eigh(symmetric)
        if (self.eigenvalues <= 0).any():
            raise ValueError("every covariance must be positive definite (the data density must exist)")
        self.log_weights = self.weights.log()
        self.sample_factors = self.eigenvectors * self.eigenvalues.sqrt()[:, None, :]

    def to(self, device: torch.device | str) -> DiffusedMixture:
        """The same mixture with its tensors on `device`, so evaluation next to a model avoids copies."""
        return DiffusedMixture(self.weights.to(device), self.means.to(device), self.covariances.to(device))

    def _flat_inputs(self, x: Tensor, alpha_bar: Tensor | float) -> tuple[Tensor, Tensor]:
        """x as (B, D) float64 and ᾱ as (B,) float64, both on the mixture's device."""
        flat = x.reshape(len(x), -1).to(self.means.device, torch.float64)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} values per row; the mixture is {self.dim}-dimensional")
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64, device=self.means.device)
        return flat, alpha_bar.reshape(-1).expand(len(flat))

    def _component_terms(self, x: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log π_k + log N_k(x) (B, K), the eigenbasis coordinates z (B, K, D) of x − √ᾱμ_k and the
        diffused eigenvalues v (B, K, D); the score needs all three, the density only the first."""
        centred = x[:, None, :] - alpha_bar.sqrt()[:, None, None] * self.means[None]
        coords = torch.einsum("kde,bkd->bke", self.eigenvectors, centred)
        variances = alpha_bar[:, None, None] * self.eigenvalues[None] + (1 - alpha_bar)[:, None, None]
        log_normal = -0.5 * (
            (coords**2 / variances).sum(-1) + variances.log().sum(-1) + self.dim * math.log(2 * math.pi)
        )
        return self.log_weights[None] + log_normal, coords, variances

    def log_prob(self, x: Tensor, alpha_bar: Tensor | float) -> Tensor:
        """Exact log q_t(x), shape (B,): a log-sum-exp over the components' log densities."""
        flat, alpha_bar = self._flat_inputs(x, alpha_bar)
        chunks = [
            self._component_terms(rows, rows_alpha_bar)[0].logsumexp(-1)
            for rows, rows_alpha_bar in row_chunks(flat, alpha_bar)
        ]
        return torch.cat(chunks).to(x.device)

    def _flat_score(self, x: Tensor, alpha_bar: Tensor) -> Tensor:
        """−Σ_k r_k U_k diag(1/v_k) U_kᵀ(x − √ᾱμ_k) for flat x (B, D) and ᾱ (B,)."""
        chunks = []
        for rows, rows_alpha_bar in row_chunks(x, alpha_bar):
            joint, coords, variances = self._component_terms(rows, rows_alpha_bar)
            per_component = torch.einsum("kde,bke->bkd", self.eigenvectors, coords / variances)
            chunks.append(-(joint.softmax(-1)[..., None] * per_component).sum(1))
        return torch.cat(chunks)

    def score(self, x: Tensor, alpha_bar: Tensor | float) -> Tensor:
        """∇_x log q_t(x) = −Σ_k r_k(x) (ᾱΣ_k + (1 − ᾱ)I)^{-1}(x − √ᾱμ_k), r_k the responsibilities."""
        flat, alpha_bar = self._flat_inputs(x, alpha_bar)
        return self._flat_score(flat, alpha_bar).reshape(x.shape).to(x.device)

    def eps_star(self, x: Tensor, alpha_bar: Tensor | float) -> Tensor:
        """The optimal ε-prediction E[ε | x_t] = −√(1 − ᾱ) ∇log q_t(x_t) (Tweedie)."""
        flat, alpha_bar = self._flat_inputs(x, alpha_bar)
        eps = -(1 - alpha_bar).sqrt()[:, None] * self._flat_score(flat, alpha_bar)
        return eps.reshape(x.shape).to(x.device)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n independent draws from q_0, (n, D) float64: a component k by weight, then μ_k + U_k √λ_k ⊙ z."""
        device = generator.device
        components = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        normal = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=device)
        components, normal = components.to(self.means.device), normal.to(self.means.device)
        # Rows grouped by component so that each group is one matrix product, then put back in draw order.
        order = components.argsort()
        groups = normal[order].split(torch.bincount(components, minlength=self.num_components).tolist())
        drawn = torch.cat(
            [torch.addmm(self.means[k], group, self.sample_factors[k].T) for k, group in enumerate(groups)]
        )
        samples = torch.empty_like(drawn)
        samples[order] = drawn
        return samples

    def mean(self) -> Tensor:
        """E[x] under q_0, (D,)."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x] under q_0, (D, D): law of total covariance, E[Σ_k] + Cov[μ_k]."""
        centred = self.means - self.mean()
        within = torch.einsum("k,kde->de", self.weights, self.covariances)
        between = torch.einsum("k,kd,ke->de", self.weights, centred, centred)
        return within + between


def cache_dir() -> Path:
    """Where fitted mixtures are kept: $DIFFBENCH_CACHE, else ~/.cache/diffbench."""
    return Path(os.environ.get("DIFFBENCH_CACHE", Path.home() / ".cache" / "diffbench"))


def fit_digits_mixture(
    num_components: int = 20, covariance_type: str = "full", seed: int = 0, reg_covar: float = 1e-2
) -> DiffusedMixture:
    """Fit scikit-learn's GaussianMixture to all 1,797 digits (flat, in [−1, 1]), once per setting.

    The fitted parameters are cached under a hash of the settings, the data and the scikit-learn
    version, so every run and every DDP process sees the same ground truth and reuse is instant.
    `reg_covar` is added to every covariance's diagonal: the digits' border pixels are almost
    constant, and without it those directions would have near-zero variance, a density that is
    a spike and a score far stiffer than any DDPM noise level resolves.
    """
    images = digits_images()[0].reshape(-1, 64).double().numpy()
    settings = {
        "num_components": num_components,
        "covariance_type": covariance_type,
        "seed": seed,
        "reg_covar": reg_covar,
        "sklearn": sklearn.__version__,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode() + images.tobytes()).hexdigest()[:16]
    path = cache_dir() / f"gmm-digits-{key}.pt"
    if path.exists():
        return DiffusedMixture(**torch.load(path))
    model = GaussianMixture(
        n_components=num_components, covariance_type=covariance_type, reg_covar=reg_covar, random_state=seed
    )
    # Single-threaded: on a small busy machine the BLAS/OpenMP threads of this tiny EM spin against each
    # other and the fit runs some fifty times slower.
    with threadpool_limits(limits=1):
        model.fit(images)
    params = {
        "weights": torch.from_numpy(model.weights_),
        "means": torch.from_numpy(model.means_),
        "covariances": torch.from_numpy(full_covariances(model)),
    }
    atomic.save_with(path, lambda tmp: torch.save(params, tmp))
    return DiffusedMixture(**params)


def full_covariances(model: GaussianMixture) -> np.ndarray:
    """Every covariance type of scikit-learn as a (K, D, D) stack, so the mixture needs one code path."""
    num_components, dim = model.means_.shape
    if model.covariance_type == "full":
        return model.covariances_
    if model.covariance_type == "tied":
        return np.broadcast_to(model.covariances_, (num_components, dim, dim)).copy()
    variances = model.covariances_
    if model.covariance_type == "spherical":
        variances = np.repeat(variances[:, None], dim, axis=1)
    return np.stack([np.diag(v) for v in variances])


class FreshDraws:
    """Batch k drawn anew from the mixture by a generator seeded with (seed, k): the model never
    sees a sample twice, so it fits the mixture itself rather than a finite sample of it, and a
    rerun (or a resume, or any worker) draws the very same batches."""

    def __init__(self, mixture: DiffusedMixture, batch_size: int, seed: int) -> None:
        self.mixture = mixture
        self.batch_size = batch_size
        self.seed = seed

    def __call__(self, index: int) -> Tensor:
        x = self.mixture.sample(self.batch_size, Streams(self.seed).batches(index)).float()
        return x.reshape(self.batch_size, *GMMDataModule.image_shape)


class GMMDataModule(ArrayDataModule):
    """Samples from the fitted mixture as (N, 1, 8, 8) float32 images; `mixture` is the exact truth.

    The mixture itself is fixed by `fit_seed` (the same truth for every run), and so are the
    train/val/test samples drawn from it, by `split_seed`. With `fresh_samples` (the default) every
    training batch is a new draw (FreshDraws, following the run's `seed`): data without limit, so no
    arm is judged by how it overfits; otherwise training cycles over the fixed `num_train` split.
    """

    num_levels = None
    image_shape = (1, 8, 8)
    SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}

    def __init__(
        self,
        num_components: int = 20,
        covariance_type: str = "full",
        reg_covar: float = 1e-2,
        num_train: int = 20000,
        num_val: int = 1000,
        num_test: int = 1000,
        fit_seed: int = 0,
        fresh_samples: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.fresh_samples = fresh_samples
        self.mixture = fit_digits_mixture(num_components, covariance_type, fit_seed, reg_covar)

    def load_splits(self) -> dict[str, Tensor]:
        splits = {}
        for name, size in self.sizes.items():
            generator = split_stream(self.split_seed, self.SPLIT_STREAMS[name])
            splits[name] = self.mixture.sample(size, generator).float().reshape(size, *self.image_shape)
        return splits

    def batch_maker(self) -> Callable[[int], Tensor]:
        """With `fresh_samples`, every step's batch is a new draw from the mixture (FreshDraws);
        otherwise shuffles of the fixed `num_train` split, like every other dataset."""
        if not self.fresh_samples:
            return super().batch_maker()
        return FreshDraws(self.mixture, self.batch_size, self.seed)
