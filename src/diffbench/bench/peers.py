"""Throughput baselines for speed work (`train`, `eval`) and `peers`: diffbench against diffusers
and a one-timestep-per-call VLB in one process, in interleaved rounds. Every network is built by
the runs' own builder from a composed spec; weights are random: speed does not depend on them."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffbench.config import compose
from diffbench.core.diffusion import NoiseSchedule
from diffbench.core.heads import Denoiser, get_head
from diffbench.core.unet import count_parameters
from diffbench.sampling.nll import ode_nll_bpd, stratified_timesteps, stratified_weights, vlb_bpd
from diffbench.sampling.samplers import ddim, ddpm_ancestral, sample
from diffbench.spec import RunSpec, build_spec
from diffbench.train.build import build_datamodule, build_module, build_net

TINY_MODEL = [
    "model.base_channels=8",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.norm_groups=8",
]
"""--tiny: a few-thousand-parameter U-Net of either preset, so a test runs every row in seconds."""
TINY_TIMESTEPS = 20
CIFAR = "unet_ddpm_cifar"
PEER_NAMES = {
    "train": "diffusers UNet2DModel, same configuration",
    "vlb": "vlb_bpd with batch_timesteps=1 (improved-diffusion's calc_bpd_loop)",
    "ddim": "diffusers DDIMScheduler loop over the same network",
    "ancestral": "diffusers DDPMScheduler loop over the same network",
}


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so a wall-clock reading covers the work it names."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def bench_spec(model: str, overrides: Sequence[str]) -> RunSpec:
    """The spec of a run of `model` with these overrides: what the benchmarks build from."""
    return build_spec(compose([f"model={model}", *overrides]))


def bench_train(model: str, device: torch.device, batch_size: int, steps: int, extra: list[str]) -> None:
    spec = bench_spec(model, extra)
    datamodule = build_datamodule(spec)
    module = build_module(spec, datamodule.num_levels).to(device).train()
    generator = torch.Generator(device=device).manual_seed(0)
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
    x0 = datamodule.split("train")[:batch_size].to(device)
    while len(x0) < batch_size:
        x0 = torch.cat([x0, x0])[:batch_size]

    def step() -> None:
        for _ in range(steps):
            t, terms_per_draw = module.weighting.sample_timesteps(
                module.schedule, batch_size, generator, spec.diffusion.variance
            )
            eps = torch.randn(x0.shape, generator=generator, device=device)
            loss = module.loss_terms(x0, t, eps, terms_per_draw)["loss"].mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    seconds = timed(step, device) / steps
    print(f"train  {model} batch {batch_size}: {seconds * 1e3:.1f} ms/step, {batch_size / seconds:.0f} img/s")


def bench_eval(model: str, device: torch.device, num_images: int, extra: list[str]) -> None:
    spec = bench_spec(model, extra)
    datamodule = build_datamodule(spec)
    schedule = NoiseSchedule(spec.diffusion.schedule, spec.diffusion.num_timesteps).to(device)
    net = build_net(spec).to(device).eval()
    denoiser = Denoiser(net, get_head(spec.arm.head), schedule)
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


@dataclass(frozen=True)
class Variant:
    """How a training step runs: the precision and layout switches of the `speed` config."""

    name: str
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False


FP32 = Variant("fp32")
CUDA_VARIANTS = (
    FP32,
    Variant("bf16", bf16=True),
    Variant("bf16+cl", bf16=True, channels_last=True),
    Variant("bf16+cl+compile", bf16=True, channels_last=True, compile=True),
)


class DiffusersNet(nn.Module):
    """diffusers' UNet2DModel behind diffbench's `(x, t) -> tensor` signature."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.unet(x, t, return_dict=False)[0]


def diffusers_unet(args: dict[str, Any]) -> DiffusersNet:
    """diffusers' UNet2DModel built to diffbench's UNet configuration, layer for layer (same
    parameter count); the few settings diffusers cannot express are refused, not approximated."""
    from diffusers import UNet2DModel

    mult, base, groups = args["channel_mult"], args["base_channels"], args.get("norm_groups", 32)
    if mult[0] != 1 or args.get("num_heads", 1) != 1 or base * min(mult) < groups:
        raise ValueError(
            "diffusers' UNet2DModel matches diffbench's UNet only with channel_mult[0] = 1, one "
            f"attention head and at least norm_groups channels per layer; got {args}"
        )
    resolutions = [args["image_size"] // 2**level for level in range(len(mult))]
    attention = [resolution in args["attention_resolutions"] for resolution in resolutions]
    unet = UNet2DModel(
        sample_size=args["image_size"],
        in_channels=args["in_channels"],
        out_channels=args.get("out_channels") or args["in_channels"],
        block_out_channels=tuple(base * m for m in mult),
        layers_per_block=args["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=None,
        norm_num_groups=groups,
        dropout=args.get("dropout", 0.0),
    )
    return DiffusersNet(unet)


def training_step(
    net: nn.Module,
    variant: Variant,
    batch: int,
    args: dict[str, Any],
    num_timesteps: int,
    device: torch.device,
) -> Callable[[], None]:
    """One ε-regression step (forward, backward, AdamW) on fixed random tensors, identical for
    both networks so only the network differs; values do not change the speed."""
    layout = torch.channels_last if variant.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=layout).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    model = torch.compile(net) if variant.compile else net
    shape = (batch, args["in_channels"], args["image_size"], args["image_size"])
    generator = torch.Generator(device=device).manual_seed(0)
    xt = torch.randn(shape, generator=generator, device=device).contiguous(memory_format=layout)
    noise = torch.randn(shape, generator=generator, device=device)
    t = torch.randint(1, num_timesteps + 1, (batch,), generator=generator, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            output = model(xt, t)
        loss = F.mse_loss(output.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call as counted by torch's FlopCounterMode (matmuls, convolutions, attention).
    Attention runs in its math kernel here: the counter misses some fused kernels (CPU flash)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def interleaved(
    fns: Sequence[Callable[[], object]], rounds: int, repeats: int, warmup: int, device: torch.device
) -> list[list[float]]:
    """Seconds per call of each fn, one value per round; the fns take turns within every round so
    a change in machine load hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, seconds in zip(fns, times):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            synchronize(device)
            seconds.append((time.perf_counter() - start) / repeats)
    return times


def spread(values: list[float]) -> dict[str, Any]:
    """Median, range and every round's value: the range says how far one median can be trusted."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def comparison(key: str, label: str, times: list[list[float]]) -> dict[str, Any]:
    """A table row: both timings and peer/diffbench, as the ratio of medians and per round."""
    ours, peer = times
    ratios = [p / o for o, p in zip(ours, peer)]
    ratio = statistics.median(peer) / statistics.median(ours)
    return {
        "key": key,
        "label": label,
        "peer": PEER_NAMES[key.split("/")[0]],
        "diffbench_s": spread(ours),
        "peer_s": spread(peer),
        "ratio": {**spread(ratios), "of_medians": ratio},
    }


def matmul_ceiling(size: int, dtype: torch.dtype, rounds: int, device: torch.device) -> dict[str, Any]:
    """FLOP/s of a large square matmul: what this device reaches on the easiest dense work."""
    generator = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device).to(dtype) for _ in range(2))
    (seconds,) = interleaved([lambda: a @ b], rounds, repeats=3, warmup=1, device=device)
    median = statistics.median(seconds)
    return {"size": size, "dtype": str(dtype), "seconds": spread(seconds), "flop_per_s": 2 * size**3 / median}


def train_rows(
    preset: str,
    variants: Sequence[Variant],
    batch: int,
    overrides: list[str],
    num_timesteps: int,
    rounds: int,
    repeats: int,
    ceilings: dict[str, dict[str, Any]],
    device: torch.device,
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Parameter counts, then one row per variant: diffbench's UNet vs diffusers' UNet2DModel."""
    spec = bench_spec(preset, [*overrides, "model.dropout=0.0"])
    args = spec.model.arguments()
    nets = [build_net(spec), diffusers_unet(args)]
    params = {"diffbench": count_parameters(nets[0]), "diffusers": count_parameters(nets[1])}
    flops = [
        step_flops(training_step(copy.deepcopy(net), FP32, batch, args, num_timesteps, device))
        for net in nets
    ]
    rows = []
    for variant in variants:
        steps = [
            training_step(copy.deepcopy(net), variant, batch, args, num_timesteps, device) for net in nets
        ]
        times = interleaved(steps, rounds, repeats, warmup=2, device=device)
        row = comparison(f"train/{preset}/{variant.name}", f"train {preset} {variant.name} b{batch}", times)
        ceiling = "bf16" if variant.bf16 else "fp32"
        achieved = [count / statistics.median(seconds) for count, seconds in zip(flops, times)]
        row["flops"] = dict(zip(("diffbench", "peer"), flops))
        row["flop_per_s"] = dict(zip(("diffbench", "peer"), achieved))
        row["ceiling"] = ceiling
        row["pct_of_ceiling"] = {
            who: 100 * rate / ceilings[ceiling]["flop_per_s"] for who, rate in row["flop_per_s"].items()
        }
        rows.append(row)
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return params, rows


def diffusers_loop(
    scheduler: Any,
    eps_fn: Callable[[Tensor, Tensor], Tensor],
    shape: tuple[int, ...],
    steps: int,
    device: torch.device,
) -> Tensor:
    """The loop of diffusers' DDPMPipeline / DDIMPipeline, around an ε-prediction callable."""
    generator = torch.Generator(device=device).manual_seed(0)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=generator, device=device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, t), t, x, generator=generator).prev_sample
    return x


def eval_rows(
    model: str,
    overrides: list[str],
    schedule: NoiseSchedule,
    num_images: int,
    rounds: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Full-T VLB batched over timesteps vs one timestep per call, and DDIM / ancestral sampling
    with diffbench's samplers vs diffusers' scheduler loops, all over one ε network."""
    from diffusers import DDIMScheduler, DDPMScheduler

    spec = bench_spec(model, overrides)
    args = spec.model.arguments()
    denoiser = Denoiser(build_net(spec).to(device).eval(), get_head("eps"), schedule)
    shape = (num_images, args["in_channels"], args["image_size"], args["image_size"])
    T = schedule.num_timesteps
    levels = 256
    x0 = torch.randint(0, levels, shape, generator=torch.Generator().manual_seed(0)) * (2 / (levels - 1)) - 1
    x0 = x0.to(device)

    def generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(0)

    def vlb(batch_timesteps: int) -> Callable[[], object]:
        return lambda: vlb_bpd(denoiser, schedule, x0, levels, generator(), batch_timesteps=batch_timesteps)

    def diffusers_eps(x: Tensor, t: Tensor) -> Tensor:
        """diffusers counts t = 0..T-1 where diffbench counts 1..T."""
        return denoiser(x, (t + 1).to(device).expand(x.shape[0]))

    betas = schedule.betas[1:].cpu().numpy()
    ddim_scheduler = DDIMScheduler(num_train_timesteps=T, trained_betas=betas, clip_sample=True)
    ddpm_scheduler = DDPMScheduler(
        num_train_timesteps=T, trained_betas=betas, variance_type="fixed_large", clip_sample=True
    )
    ddim_steps = min(50, T)
    pairs = [
        ("vlb", f"VLB all {T} t, {num_images} images", vlb(50), vlb(1)),
        (
            "ddim",
            f"sample DDIM-{ddim_steps}, {num_images} images",
            lambda: ddim(denoiser, schedule, shape, generator(), steps=ddim_steps),
            lambda: diffusers_loop(ddim_scheduler, diffusers_eps, shape, ddim_steps, device),
        ),
        (
            "ancestral",
            f"sample ancestral-{T}, {num_images} images",
            lambda: ddpm_ancestral(denoiser, schedule, shape, generator()),
            lambda: diffusers_loop(ddpm_scheduler, diffusers_eps, shape, T, device),
        ),
    ]
    rows = []
    for key, label, ours, peer in pairs:
        with torch.no_grad():
            rows.append(comparison(key, label, interleaved([ours, peer], rounds, 1, warmup=1, device=device)))
    return rows


def format_spread(seconds: dict[str, Any]) -> str:
    """Median [min-max], all in the median's unit (ms under a second)."""
    scale, unit, digits = (1e3, "ms", 1) if seconds["median"] < 1 else (1.0, "s", 2)
    low, mid, high = (f"{seconds[k] * scale:.{digits}f}" for k in ("min", "median", "max"))
    return f"{mid} [{low}-{high}] {unit}"


WIDTHS = (24, 24, 26, 19, 13)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Medians with their min–max over rounds; ratio > 1 means diffbench is faster."""
    columns = ("diffbench", "peer", "peer/diffbench [min-max]", "GFLOP/s ours/peer", "% ceiling")
    header = f"{'row':40s} " + " ".join(f"{c:>{w}s}" for c, w in zip(columns, WIDTHS))
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [format_spread(row[who]) for who in ("diffbench_s", "peer_s")]
        r = row["ratio"]
        ratio = f"{r['of_medians']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"
        rate = pct = ""
        if "flop_per_s" in row:
            rate = "/".join(f"{row['flop_per_s'][w] / 1e9:.1f}" for w in ("diffbench", "peer"))
            pct = "/".join(f"{row['pct_of_ceiling'][w]:.1f}" for w in ("diffbench", "peer"))
        values = (*cells, ratio, rate, pct)
        lines.append(f"{row['label']:40s} " + " ".join(f"{v:>{w}s}" for v, w in zip(values, WIDTHS)))
    return "\n".join(lines)


def bench_peers(
    model: str,
    device: torch.device,
    batch_size: int,
    steps: int,
    num_images: int,
    rounds: int,
    tiny: bool,
    extra: list[str],
) -> dict[str, Any]:
    """Every peer row, ceilings and parameter counts: printed as a table and returned for JSON."""
    import diffusers

    overrides = [*extra, *(TINY_MODEL if tiny else [])]
    spec = bench_spec(model, overrides)
    T = TINY_TIMESTEPS if tiny else spec.diffusion.num_timesteps
    schedule = NoiseSchedule(spec.diffusion.schedule, T).to(device)
    size = 256 if tiny else (8192 if device.type == "cuda" else 2048)
    ceilings = {"fp32": matmul_ceiling(size, torch.float32, rounds, device)}
    if device.type == "cuda":
        ceilings["bf16"] = matmul_ceiling(size, torch.bfloat16, rounds, device)
    plan = {model: [FP32]}
    if device.type == "cuda":
        plan[CIFAR] = list(CUDA_VARIANTS)
    params, rows = {}, []
    for preset, variants in plan.items():
        params[preset], preset_rows = train_rows(
            preset, variants, batch_size, overrides, T, rounds, steps, ceilings, device
        )
        rows += preset_rows
    rows += eval_rows(model, overrides, schedule, num_images, rounds, device)
    for preset, counts in params.items():
        gap = counts["diffusers"] - counts["diffbench"]
        same = "same" if gap == 0 else f"diffusers {gap:+,}"
        print(
            f"params {preset}: diffbench {counts['diffbench']:,}, diffusers {counts['diffusers']:,} ({same})"
        )
    for name, ceiling in ceilings.items():
        print(f"ceiling {name} matmul {ceiling['size']}^2: {ceiling['flop_per_s'] / 1e9:.1f} GFLOP/s")
    print(format_table(rows))
    print("peers: " + "; ".join(f"{key}: {name}" for key, name in PEER_NAMES.items()))
    return {
        "device": str(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "tiny": tiny,
        "rounds": rounds,
        "train_steps_per_round": steps,
        "num_timesteps": T,
        "params": params,
        "ceilings": ceilings,
        "rows": rows,
    }
