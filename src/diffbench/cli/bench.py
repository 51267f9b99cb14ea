"""`python -m diffbench.bench train|eval [--model unet_small] [--device cpu]`: throughput
baselines for speed work. Weights are random: speed does not depend on them."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from diffbench.config import compose
from diffbench.core.diffusion import NoiseSchedule
from diffbench.core.heads import Denoiser, get_head
from diffbench.sampling.nll import ode_nll_bpd, stratified_timesteps, stratified_weights, vlb_bpd
from diffbench.sampling.samplers import sample
from diffbench.train.build import build_datamodule, build_module, build_net


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bench_train(model: str, device: torch.device, batch_size: int, steps: int, extra: list[str]) -> None:
    cfg = compose([f"model={model}", *extra])
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.num_levels).to(device).train()
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
    x0 = datamodule.split("train")[:batch_size].to(device)
    while len(x0) < batch_size:
        x0 = torch.cat([x0, x0])[:batch_size]

    def step() -> None:
        for _ in range(steps):
            t, terms_per_draw = module.weighting.sample_timesteps(
                module.schedule, batch_size, device, cfg.diffusion.variance
            )
            loss = module.loss_terms(x0, t, torch.randn_like(x0), terms_per_draw)["loss"].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    seconds = timed(step, device) / steps
    print(f"train  {model} batch {batch_size}: {seconds * 1e3:.1f} ms/step, {batch_size / seconds:.0f} img/s")


def bench_eval(model: str, device: torch.device, num_images: int, extra: list[str]) -> None:
    cfg = compose([f"model={model}", *extra])
    datamodule = build_datamodule(cfg)
    schedule = NoiseSchedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps).to(device)
    net = build_net(cfg).to(device).eval()
    denoiser = Denoiser(net, get_head(cfg.objective.head), schedule)
    x0 = datamodule.split("test")[:num_images].to(device)
    n = len(x0)
    T = schedule.num_timesteps
    levels = datamodule.num_levels
    gen = torch.Generator(device=device)
    rows = [
        (
            "VLB, all T terms",
            lambda: vlb_bpd(denoiser, schedule, x0, levels, gen.manual_seed(0), batch_timesteps=50),
            n,
        ),
        (
            "VLB, stratified 100 t",
            lambda: vlb_bpd(
                denoiser,
                schedule,
                x0,
                levels,
                gen.manual_seed(0),
                timesteps=stratified_timesteps(T, 100, torch.Generator(device=device).manual_seed(0)),
                weights=stratified_weights(T, 100),
                batch_timesteps=50,
            ),
            n,
        ),
        (
            "ODE NLL dopri5 1e-3",
            lambda: ode_nll_bpd(
                denoiser, schedule, x0[:64], levels, gen.manual_seed(0), rtol=1e-3, atol=1e-3
            ),
            min(n, 64),
        ),
    ]
    shape = (num_images, *datamodule.image_shape)
    for name, settings in [
        ("ancestral", {"steps": None}),
        ("ancestral", {"steps": 100}),
        ("ddim", {"steps": 50}),
        ("ode", {"method": "heun", "steps": 50}),
    ]:
        rows.append(
            (
                f"sample {name} {settings}",
                lambda name=name, settings=settings: sample(
                    name, denoiser, schedule, shape, gen.manual_seed(0), **settings
                ),
                num_images,
            )
        )
    for label, fn, count in rows:
        with torch.no_grad() if "ODE" not in label else torch.enable_grad():
            seconds = timed(fn, device, repeats=1)
        print(f"eval   {label:45s} {seconds:8.2f} s  {count / seconds:9.1f} img/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbench.bench", description=__doc__)
    parser.add_argument("what", choices=["train", "eval"])
    parser.add_argument("--model", default="unet_small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-images", type=int, default=360)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data=gmm")
    options = parser.parse_intermixed_args(argv)
    device = torch.device(options.device)
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(f"device {device} ({where})")
    if options.what == "train":
        bench_train(options.model, device, options.batch_size, options.steps, options.overrides)
    else:
        bench_eval(options.model, device, options.num_images, options.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
