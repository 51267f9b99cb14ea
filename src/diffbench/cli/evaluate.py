"""`python -m diffbench.evaluate run_dir=… [sampler=ddim steps=100 eval.KEY=VALUE …]`: evaluate a
finished run again with other settings; its results.json is updated in place (atomically)."""

from __future__ import annotations

import json
import sys

import torch
from omegaconf import OmegaConf

from diffbench.atomic import check_replaceable
from diffbench.cli.checks import check_budgets
from diffbench.config import ConfigError, apply_value, parse_overrides
from diffbench.evaluation.evaluate import evaluate
from diffbench.rundir import CHECKPOINTS, COMPLETE, CONFIG, DIVERGED, RESULTS, RunDir
from diffbench.spec import build_spec
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
        checkpoint, step, damaged = run_dir.latest_checkpoint()
        for path in damaged:
            print(f"[diffbench] checkpoint {path} cannot be loaded (damaged or cut short); passing over it")
        if not (run_dir / CONFIG).is_file() or checkpoint is None:
            raise ConfigError(
                f"{run_dir.path} is not a trained run directory: it needs {CONFIG} and a checkpoint "
                f"that loads in {CHECKPOINTS}/."
            )
        cfg = OmegaConf.load(run_dir / CONFIG)
        results = run_dir.read_results()
        if results is not None and results.get("status") == DIVERGED:
            raise ConfigError(
                f"{run_dir.path} diverged at step {results.get('diverged_at_step')}: its network is not "
                "finite, so there is nothing to evaluate. Train it again with a smaller optim.lr."
            )
        if step < cfg.trainer.max_steps:
            raise ConfigError(
                f"{run_dir.path} stopped at step {step} of trainer.max_steps={cfg.trainer.max_steps}: "
                "evaluating it would record a partly trained network as the finished run. Finish it "
                f"first with `python -m diffbench.run` and the same settings plus run.dir={run_dir.path} "
                "(it resumes from its newest checkpoint)."
            )
        choices, values = parse_overrides([a for a in args if not a.startswith("run_dir=")])
        for key, value in [*choices.items(), *values]:
            key = EVAL_SHORTCUTS.get(key, key)
            if not key.startswith("eval.") or key == "eval.enabled":
                raise ConfigError(
                    f"{key} cannot be changed by evaluate: the network was trained with the run's "
                    f"{CONFIG}, so only the evaluation settings (eval.KEY=VALUE, or the shortcuts "
                    f"{', '.join(EVAL_SHORTCUTS)}) may differ. Train a new run to change {key}."
                )
            apply_value(cfg, key, value)
        spec = build_spec(cfg)
        check_budgets(spec)
        check_replaceable(run_dir.path / RESULTS)
    except ConfigError as error:
        print(f"diffbench.evaluate: {error}", file=sys.stderr)
        return 2
    datamodule = build_datamodule(spec)
    module = build_module(spec, datamodule.num_levels)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    try:
        with run_dir.exclusive():
            evaluation, seconds = evaluate(module.denoiser, datamodule, spec, run_dir)
            results = results or {"status": COMPLETE, "run_dir": str(run_dir.path)}
            results.setdefault("metrics", {}).update(evaluation.metrics)
            results.setdefault("evaluation", {}).update(evaluation.settings)
            results["eval_wall_time_s"] = seconds
            run_dir.write_results(results)
    except ConfigError as error:
        print(f"diffbench.evaluate: {error}", file=sys.stderr)
        return 2
    print(json.dumps(results["metrics"], indent=2))
    return 0
