"""`python -m diffbench.bench train|eval|peers [--model unet_small] [--device cpu]`: throughput
baselines for speed work, and `peers`: diffbench against diffusers and a one-timestep-per-call
VLB in one process, in interleaved rounds (`diffbench.bench.peers`). Weights are random: speed
does not depend on them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from diffbench.atomic import write_json
from diffbench.bench.peers import bench_eval, bench_peers, bench_train

PEERS_MISSING = (
    "`python -m diffbench.bench peers` times diffbench against diffusers' UNet2DModel and "
    "schedulers, and diffusers is not installed: it is an optional extra, not a dependency of "
    "diffbench. Install it with `pip install -e '.[bench]'` from the repository root (or "
    "`.venv/bin/pip install diffusers`) and run the command again; `train` and `eval` need nothing extra."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffbench.bench", description=__doc__)
    parser.add_argument("what", choices=["train", "eval", "peers"])
    parser.add_argument("--model", default="unet_small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="train: steps timed; peers: per round")
    parser.add_argument("--num-images", type=int, help="eval: 360; peers (VLB, sampling): 64")
    parser.add_argument("--rounds", type=int, help="peers: interleaved rounds (5; --tiny: 2)")
    parser.add_argument("--tiny", action="store_true", help="peers: tiny model, batch 8, T = 20")
    parser.add_argument("--json", type=Path, help="peers: also write the results here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data=gmm")
    options = parser.parse_intermixed_args(argv)
    device = torch.device(options.device)
    if options.what == "peers":
        try:
            import diffusers  # noqa: F401
        except ImportError:
            print(PEERS_MISSING, file=sys.stderr)
            return 2
    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(f"device {device} ({where})")
    if options.what == "train":
        bench_train(options.model, device, options.batch_size, options.steps, options.overrides)
    elif options.what == "eval":
        bench_eval(options.model, device, options.num_images or 360, options.overrides)
    else:
        tiny = options.tiny
        report = bench_peers(
            options.model,
            device,
            batch_size=8 if tiny else options.batch_size,
            steps=1 if tiny else options.steps,
            num_images=8 if tiny else options.num_images or 64,
            rounds=options.rounds or (2 if tiny else 5),
            tiny=tiny,
            extra=options.overrides,
        )
        if options.json is not None:
            write_json(options.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
