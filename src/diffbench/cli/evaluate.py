"""`python -m diffbench.evaluate run_dir=… [sampler=ddim steps=100 eval.KEY=VALUE …]`: evaluate a
finished run again with other settings; its results.json is updated in place (atomically). The
sequence is `pipeline.reevaluate`; this is the command line around it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from diffbench.atomic import check_replaceable
from diffbench.cli.checks import refuse
from diffbench.config import ConfigError, apply_value, parse_overrides
from diffbench.pipeline import reevaluate
from diffbench.rules import check_evaluation
from diffbench.rundir import CHECKPOINTS, CONFIG, DIVERGED, RESULTS, RunDir
from diffbench.spec import RunSpec, build_spec

EVAL_SHORTCUTS = {
    "sampler": "eval.sampler",
    "steps": "eval.sampler_steps",
    "eta": "eval.ddim_eta",
    "num_samples": "eval.num_samples",
}


def finished_run(run_dir: RunDir) -> tuple[dict, dict | None, Path]:
    """The stored config, results (None when there are none) and newest checkpoint of a run that
    finished training; a ConfigError, before anything is computed, for anything else: no run, a
    config.yaml or results.json that cannot be read back, a diverged or partly trained run."""
    checkpoint, step, damaged = run_dir.latest_checkpoint()
    for path in damaged:
        print(f"[diffbench] checkpoint {path} cannot be loaded (damaged or cut short); passing over it")
    if not (run_dir / CONFIG).is_file() or checkpoint is None:
        raise ConfigError(
            f"{run_dir.path} is not a trained run directory: it needs {CONFIG} and a checkpoint "
            f"that loads in {CHECKPOINTS}/."
        )
    stored, problem = run_dir.read_config_or_reason()
    results, unreadable = run_dir.read_results_or_reason()
    if stored is None or (unreadable and (run_dir / RESULTS).exists()):
        raise ConfigError(
            f"{run_dir.path} cannot be evaluated: its {problem or unreadable}. Evaluating needs the "
            f"settings the network was trained with and a {RESULTS} to update; restore the file (or "
            "train the run again). Nothing was computed or written."
        )
    if results is not None and results.get("status") == DIVERGED:
        raise ConfigError(
            f"{run_dir.path} diverged at step {results.get('diverged_at_step')}: its network is not "
            "finite, so there is nothing to evaluate. Train it again with a smaller optim.lr."
        )
    try:
        max_steps = build_spec(OmegaConf.create(stored)).max_steps
    except ConfigError as error:
        raise ConfigError(f"{run_dir / CONFIG} is not a run this diffbench can evaluate: {error}") from None
    if step < max_steps:
        raise ConfigError(
            f"{run_dir.path} stopped at step {step} of trainer.max_steps={max_steps}: "
            "evaluating it would record a partly trained network as the finished run. Finish it "
            f"first with `python -m diffbench.run` and the same settings plus run.dir={run_dir.path} "
            "(it resumes from its newest checkpoint)."
        )
    return stored, results, checkpoint


def evaluation_spec(stored: dict, args: list[str]) -> RunSpec:
    """The run's spec with the evaluation overrides of the command line, checked as a run's are."""
    cfg = OmegaConf.create(stored)
    choices, values = parse_overrides(args)
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
    check_evaluation(spec)
    return spec


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    run_dirs = [a.split("=", 1)[1] for a in args if a.startswith("run_dir=")]
    try:
        if len(run_dirs) != 1:
            raise ConfigError(
                "usage: python -m diffbench.evaluate run_dir=PATH [sampler=ddim steps=100 eval.KEY=VALUE …]"
            )
        run_dir = RunDir(run_dirs[0])
        stored, results, checkpoint = finished_run(run_dir)
        spec = evaluation_spec(stored, [a for a in args if not a.startswith("run_dir=")])
        check_replaceable(run_dir.path / RESULTS)
        results = reevaluate(spec, run_dir, checkpoint, results)
    except ConfigError as error:
        return refuse("evaluate", error)
    print(json.dumps(results["metrics"], indent=2))
    return 0
