"""`python -m diffbench.evaluate run_dir=… [sampler=ddim steps=100 eval.KEY=VALUE …]`: evaluate a
finished run again with other settings; its results.json is updated in place (atomically)."""

from __future__ import annotations

import json
import sys

import torch
from omegaconf import OmegaConf

from diffbench.config import ConfigError, apply_value, parse_overrides
from diffbench.evaluation.evaluate import evaluate
from diffbench.rundir import COMPLETE, CONFIG, LAST_CHECKPOINT, RunDir
from diffbench.train.build import build_datamodule, build_module

EVAL_SHORTCUTS = {
    "sampler": "eval.sampler",
    "steps": "eval.sampler_steps",
    "eta": "eval.ddim_eta",
    "num_samples": "eval.num_samples",
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    try:
        if len(run_dirs) != 1:
            raise ConfigError(
                "usage: python -m diffbench.evaluate run_dir=PATH [sampler=ddim steps=100 eval.KEY=VALUE …]"
            )
        run_dir = RunDir(run_dirs[0])
        checkpoint = run_dir.checkpoints / LAST_CHECKPOINT
        if not (run_dir / CONFIG).is_file() or not checkpoint.is_file():
            raise ConfigError(
                f"{run_dir.path} is not a trained run directory: it needs {CONFIG} and "
                f"checkpoints/{LAST_CHECKPOINT}."
            )
        cfg = OmegaConf.load(run_dir / CONFIG)
        _, values = parse_overrides([a for a in args if not a.startswith("run_dir=")])
        for key, value in values:
            apply_value(cfg, EVAL_SHORTCUTS.get(key, key), value)
    except ConfigError as error:
        print(f"diffbench.evaluate: {error}", file=sys.stderr)
        return 2
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.num_levels)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    evaluation, seconds = evaluate(module.denoiser, datamodule, cfg, run_dir)
    results = run_dir.read_results() or {"status": COMPLETE, "run_dir": str(run_dir.path)}
    results.setdefault("metrics", {}).update(evaluation.metrics)
    results.setdefault("evaluation", {}).update(evaluation.settings)
    results["eval_wall_time_s"] = seconds
    run_dir.write_results(results)
    print(json.dumps(results["metrics"], indent=2))
    return 0
