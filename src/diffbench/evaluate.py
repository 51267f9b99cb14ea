"""Evaluation that makes the arms comparable: NLL as the discrete VLB and through the
probability-flow ODE, sample-quality metrics, x̂0 trajectories, and on `gmm` the ground truth.

`python -m diffbench.evaluate run_dir=… [sampler=ddim steps=100 …]` evaluates a finished run
again; `diffbench.run` calls `evaluate` after training. Every metric is recorded with the
settings (sampler, steps, sample count, timesteps) that produced it."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchvision.utils import save_image

from diffbench import groundtruth, nll, samplers
from diffbench.data.base import ArrayDataModule
from diffbench.fidelity import sample_quality
from diffbench.module import DiffusionModule

EXTRACTOR_FIELDS = {"classifier_test_accuracy"}
"""Numbers about the feature extractor, recorded with the settings rather than as metrics."""


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


def generator_for(seed: int, purpose: int, device: torch.device) -> torch.Generator:
    """Independent, reproducible streams per purpose and per rank."""
    rank, _ = world()
    return torch.Generator(device=device).manual_seed(1_000_003 * seed + 1009 * purpose + rank)


def save_grid(images: Tensor, path: Path, nrow: int) -> None:
    """An image grid, small images enlarged (nearest neighbour) so 8×8 digits are legible."""
    scale = max(1, 32 // images.shape[-1])
    images = F.interpolate(images.clamp(-1, 1).float(), scale_factor=scale, mode="nearest")
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=1.0)


def plot_curve(
    x: Tensor, y: Tensor, path: Path, xlabel: str, ylabel: str, title: str, logy: bool = False
) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x.cpu().numpy(), y.cpu().numpy())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_curve_csv(path: Path, header: tuple[str, str], x: Tensor, y: Tensor) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(zip(x.tolist(), y.tolist()))


def evaluate_vlb(
    module: DiffusionModule, x0: Tensor, cfg: DictConfig, num_levels: int | None, seed: int, out: Path
) -> dict:
    """nll_vlb_bpd over the evaluation images: all T terms, or a stratified estimate."""
    rank, size = world()
    generator = generator_for(seed, 1, module.device)
    timesteps = weights = None
    shard = x0[rank::size].to(module.device)
    if cfg.vlb_timesteps:
        timesteps = nll.stratified_timesteps(
            module.num_timesteps, cfg.vlb_timesteps, generator, batch=len(shard)
        )
        weights = nll.stratified_weights(module.num_timesteps, cfg.vlb_timesteps)
    start = time.perf_counter()
    result = nll.vlb_bpd(
        module.eps_hat,
        module.schedule,
        shard,
        num_levels,
        generator,
        variance=module.hparams.variance,
        timesteps=timesteps,
        batch_timesteps=cfg.vlb_batch_timesteps,
        progress=rank == 0,
        weights=weights,
    )
    totals = gather_rows(result.total_bpd.cpu(), len(x0))
    terms = gather_rows(result.terms_bpd.cpu(), len(x0)).mean(0)
    mean, stderr = nll.mean_and_stderr(totals)
    steps = result.timesteps.cpu().double()
    if steps.ndim == 2:
        steps = gather_rows(steps, len(x0)).mean(0)
    if rank == 0:
        write_curve_csv(out / "vlb_terms.csv", ("t", "term_bpd"), steps, terms)
        plot_curve(
            steps,
            terms,
            out / "vlb_terms.png",
            "t",
            "L_{t-1} (bits/dim)",
            "where the bound spends its bits",
            logy=True,
        )
    return {
        "nll_vlb_bpd": mean,
        "nll_vlb_bpd_stderr": stderr,
        "nll_vlb_settings": {
            "timesteps": "all"
            if timesteps is None
            else f"stratified-{cfg.vlb_timesteps}, drawn per image, plus the decoder term (t = 1)",
            "variance": module.hparams.variance,
            "num_images": len(x0),
            "wall_time_s": round(time.perf_counter() - start, 2),
        },
    }


def evaluate_eps_profile(module: DiffusionModule, x0: Tensor, cfg: DictConfig, seed: int, out: Path) -> None:
    """Mean ‖ε − ε̂‖²/D at `profile_timesteps` log-spaced t: the measured counterpart of each
    arm's implied ε-space weight (rank zero, first 256 images)."""
    x0 = x0[:256].to(module.device)
    T = module.num_timesteps
    steps = torch.unique(
        torch.logspace(0, torch.log10(torch.tensor(float(T))), cfg.profile_timesteps).round().long()
    )
    generator = generator_for(seed, 6, module.device)
    errors = []
    with torch.no_grad():
        for step in steps.tolist():
            t = torch.full((len(x0),), step, device=module.device, dtype=torch.long)
            eps = torch.randn(x0.shape, generator=generator, device=module.device)
            alpha_bar = module.schedule.at(module.schedule.alphas_cumprod, t, x0.ndim)
            xt = (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps).float()
            errors.append(float((module.eps_hat(xt, t) - eps).pow(2).mean()))
    write_curve_csv(out / "eps_mse_by_t.csv", ("t", "eps_mse"), steps, torch.tensor(errors))


def evaluate_ode(
    module: DiffusionModule, x0: Tensor, cfg: DictConfig, num_levels: int | None, seed: int
) -> dict:
    """nll_ode_bpd on the first `ode_images` evaluation images."""
    rank, size = world()
    x0 = x0[: cfg.ode_images]
    start = time.perf_counter()
    result = nll.ode_nll_bpd(
        module.eps_hat,
        module.schedule,
        x0[rank::size].to(module.device),
        num_levels,
        generator_for(seed, 2, module.device),
        rtol=cfg.ode_rtol,
        atol=cfg.ode_atol,
        progress=rank == 0,
    )
    mean, stderr = nll.mean_and_stderr(gather_rows(result.bpd.cpu(), len(x0)))
    return {
        "nll_ode_bpd": mean,
        "nll_ode_bpd_stderr": stderr,
        "nll_ode_settings": {
            "rtol": cfg.ode_rtol,
            "atol": cfg.ode_atol,
            "num_images": len(x0),
            "nfe": result.nfe,
            "dequantization": "uniform" if num_levels else "none (continuous data)",
            "wall_time_s": round(time.perf_counter() - start, 2),
        },
    }


def sampler_settings(cfg: DictConfig) -> dict:
    """Keyword settings of the configured sampler, as recorded beside its metrics."""
    if cfg.sampler == "ancestral":
        return {"steps": cfg.sampler_steps or None, "variance": cfg.sample_variance}
    if cfg.sampler == "ddim":
        return {"steps": cfg.sampler_steps, "eta": cfg.ddim_eta}
    if cfg.sampler == "sde":
        return {"steps": cfg.sampler_steps}
    return {"method": cfg.ode_method, "steps": cfg.sampler_steps, "rtol": cfg.ode_rtol, "atol": cfg.ode_atol}


def draw(module: DiffusionModule, cfg: DictConfig, shape: tuple[int, ...], seed: int) -> tuple[Tensor, int]:
    """`num_samples` samples split across ranks (rank r draws r, r + W, …), each rank with its
    own generator; gathered so every sample exists exactly once."""
    rank, size = world()
    count = len(range(rank, cfg.num_samples, size))
    generator = generator_for(seed, 3, module.device)
    settings = sampler_settings(cfg)
    pieces, nfe = [], 0
    for start in range(0, count, cfg.sample_batch_size):
        n = min(cfg.sample_batch_size, count - start)
        result = samplers.sample(
            cfg.sampler,
            module.eps_hat,
            module.schedule,
            (n, *shape),
            generator,
            **settings,
            progress=rank == 0,
        )
        pieces.append(result.samples.cpu())
        nfe += result.nfe
    local = torch.cat(pieces) if pieces else torch.empty((0, *shape))
    return gather_rows(local, cfg.num_samples), nfe


def evaluate_samples(
    module: DiffusionModule,
    datamodule: ArrayDataModule,
    cfg: DictConfig,
    seed: int,
    out: Path,
    data_name: str,
) -> tuple[dict, Tensor]:
    start = time.perf_counter()
    samples, nfe = draw(module, cfg, datamodule.image_shape, seed)
    seconds = time.perf_counter() - start
    record = {
        "sampler": cfg.sampler,
        **sampler_settings(cfg),
        "num_samples": len(samples),
        "nfe_per_batch": nfe,
        "wall_time_s": round(seconds, 2),
    }
    if world()[0] != 0:
        return {}, samples
    save_grid(samples[:64], out / f"samples_{cfg.sampler}.png", nrow=8)
    reference = datamodule.split(cfg.reference_split)
    quality = sample_quality(
        samples,
        reference,
        dataset=data_name,
        num_levels=datamodule.num_levels,
        inception_weights=cfg.inception_weights,
        data_root=getattr(datamodule, "root", "data"),
    )
    metrics = {k: v for k, v in quality.items() if isinstance(v, float) and k not in EXTRACTOR_FIELDS}
    record.update({k: v for k, v in quality.items() if k not in metrics})
    record["reference"] = f"{cfg.reference_split} split ({len(reference)} images)"
    return {**metrics, "sample_settings": record}, samples


def evaluate_trajectory(
    module: DiffusionModule, cfg: DictConfig, shape: tuple[int, ...], seed: int, out: Path
) -> None:
    """Rows: images; columns: the model's x̂0 from t = T (left) to t = 1 (right)."""
    trajectory = samplers.x0_trajectory(
        module.eps_hat,
        module.schedule,
        (cfg.trajectory_images, *shape),
        generator_for(seed, 4, module.device),
        num_snapshots=10,
        steps=cfg.trajectory_steps or None,
    )
    grid = trajectory.x0_hats.transpose(0, 1).reshape(-1, *shape)
    save_grid(grid, out / "x0_trajectory.png", nrow=trajectory.x0_hats.shape[0])


def evaluate_groundtruth(
    module: DiffusionModule,
    datamodule: ArrayDataModule,
    x0: Tensor,
    samples: Tensor,
    cfg: DictConfig,
    seed: int,
    out: Path,
) -> dict:
    """gmm only: exact NLL, distance of the implied ε̂ to the optimal ε* per t, and how likely
    the samples are under the true density."""
    mixture = datamodule.mixture
    timesteps = torch.linspace(1, module.num_timesteps, cfg.gmm_timesteps).round().long().to(module.device)
    distance = groundtruth.eps_star_distance(
        module.eps_hat,
        mixture,
        module.schedule,
        x0.to(module.device),
        timesteps,
        generator_for(seed, 5, module.device),
    )
    write_curve_csv(out / "eps_star_distance.csv", ("t", "mse_to_eps_star"), timesteps.cpu(), distance.cpu())
    plot_curve(
        timesteps,
        distance,
        out / "eps_star_distance.png",
        "t",
        "‖ε̂ − ε*‖² / D",
        "distance to the optimal denoiser",
        logy=True,
    )
    exact = groundtruth.exact_nll_bpd(mixture, x0)
    mean, stderr = nll.mean_and_stderr(exact)
    return {
        "nll_exact_bpd": mean,
        "nll_exact_bpd_stderr": stderr,
        "eps_star_mse": float(distance.mean()),
        "sample_true_nll_bpd": groundtruth.sample_log_density_bpd(mixture, samples),
    }


def evaluate(module: DiffusionModule, datamodule: ArrayDataModule, cfg: DictConfig, out: Path) -> dict:
    """Every evaluation the config asks for; returns metrics (rank zero) with their settings."""
    ev = cfg.eval
    module.eval()
    x0 = datamodule.split(ev.split)
    if ev.num_images:
        x0 = x0[: ev.num_images]
    levels = datamodule.num_levels
    start = time.perf_counter()
    metrics = evaluate_vlb(module, x0, ev, levels, cfg.seed, out)
    if ev.ode_images:
        metrics.update(evaluate_ode(module, x0, ev, levels, cfg.seed))
    quality, samples = evaluate_samples(module, datamodule, ev, cfg.seed, out, cfg.data.name)
    metrics.update(quality)
    if world()[0] == 0:
        evaluate_eps_profile(module, x0, ev, cfg.seed, out)
        if ev.trajectory_images:
            evaluate_trajectory(module, ev, datamodule.image_shape, cfg.seed, out)
        if hasattr(datamodule, "mixture"):
            metrics.update(evaluate_groundtruth(module, datamodule, x0, samples, ev, cfg.seed, out))
    metrics["eval_wall_time_s"] = round(time.perf_counter() - start, 2)
    return metrics


EVAL_SHORTCUTS = {
    "sampler": "eval.sampler",
    "steps": "eval.sampler_steps",
    "eta": "eval.ddim_eta",
    "num_samples": "eval.num_samples",
}


def main(argv: list[str] | None = None) -> int:
    """Evaluate a finished run again with other settings; results.json is updated in place."""
    from diffbench.config import ConfigError, apply_value, parse_overrides
    from diffbench.data import build_datamodule
    from diffbench.run import build_module, write_json_atomic

    args = sys.argv[1:] if argv is None else argv
    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    try:
        if len(run_dirs) != 1:
            raise ConfigError(
                "usage: python -m diffbench.evaluate run_dir=PATH [sampler=ddim steps=100 eval.KEY=VALUE …]"
            )
        run_dir = Path(run_dirs[0])
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        if not (run_dir / "config.yaml").is_file() or not checkpoint.is_file():
            raise ConfigError(
                f"{run_dir} is not a trained run directory: it needs config.yaml and checkpoints/last.ckpt."
            )
        cfg = OmegaConf.load(run_dir / "config.yaml")
        _, values = parse_overrides([a for a in args if not a.startswith("run_dir=")])
        for key, value in values:
            apply_value(cfg, EVAL_SHORTCUTS.get(key, key), value)
    except ConfigError as error:
        print(f"diffbench.evaluate: {error}", file=sys.stderr)
        return 2
    datamodule = build_datamodule(OmegaConf.merge(cfg.data, {"seed": cfg.seed}))
    module = build_module(cfg, datamodule)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    metrics = evaluate(module, datamodule, cfg, run_dir)
    path = run_dir / "results.json"
    results = (
        json.loads(path.read_text()) if path.is_file() else {"status": "complete", "run_dir": str(run_dir)}
    )
    results.setdefault("metrics", {}).update(
        {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    )
    results.setdefault("evaluation", {}).update({k: v for k, v in metrics.items() if isinstance(v, dict)})
    write_json_atomic(path, results)
    print(json.dumps({k: v for k, v in results["metrics"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
