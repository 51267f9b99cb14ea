"""The run-directory contract: the one module that spells file names, the `results.json` schema
and its version, the metric registry and where a run or a sweep trial lives. Training, evaluation,
the report, the summary, the dashboard, the sweep and the tests all read and write through it.

A run directory holds:
    config.yaml          the resolved config (written before training)
    metrics.csv          Lightning's CSV log (train/*, val/* against step)
    checkpoints/         step*.ckpt and last.ckpt
    results.json         written last, atomically; `status` says whether the run is complete
                         `optimisation`: gradient_clip_val, clipped_fraction, grad_norm_median/_max
                         (total norm before clipping) over steps_measured steps; `evaluation.baselines`:
                         a per-pixel histogram's NLL and the real-vs-real floor of the FD (train split)
    budgets.csv          the cheap metrics at each training budget, a row per budget, as they come
    *.csv, *.png         per-t curves and image grids of the evaluation (CURVES, IMAGES)
    sweep.log            a sweep trial's output when trials run in parallel
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import yaml

from diffbench import atomic
from diffbench.config import ConfigError, yaml_problem
from diffbench.core.arms import Arm
from diffbench.sampling.samplers import SAMPLERS
from diffbench.schema import current_names, is_int, stored_problem
from diffbench.spec import RunSpec

SCHEMA_VERSION = 2
"""2: `arm` is a field, the head's unweighted MSE is the weighting "own", and `eval_wall_time_s`
is a top-level field. 1 (no `schema_version`): that weighting was called "simple", and the
evaluation's wall time sat among the metrics."""

CONFIG = "config.yaml"
RESULTS = "results.json"
METRICS_CSV = "metrics.csv"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
SWEEP_LOG = "sweep.log"
BUDGETS_CSV = "budgets.csv"
SAMPLE_GRID = "samples.png"
X0_TRAJECTORY = "x0_trajectory.png"
COMPLETE = "complete"
DIVERGED = "diverged"
FINAL = (COMPLETE, DIVERGED)
"""Statuses a rerun of the same config leaves alone: a diverged run diverges again."""
LOCK = ".lock"
IDENTITY_EXCLUDES = ("run", "wandb", "report", "experiment")
RUN_DIR_ENV = "DIFFBENCH_RUN_DIR"


def media_key(image: str) -> str:
    """The W&B key an evaluation image is logged under: `eval/<file stem>`."""
    return f"eval/{Path(image).stem}"


def sample_grid(sampler: str) -> str:
    """The 64-sample grid of the evaluation's sampler."""
    return f"samples_{sampler}.png"


@dataclass(frozen=True)
class Curve:
    """A per-t curve of the evaluation: `<name>.csv` with two columns, and `<name>.png`."""

    name: str
    columns: tuple[str, str]
    ylabel: str
    title: str

    @property
    def csv(self) -> str:
        return f"{self.name}.csv"

    @property
    def png(self) -> str:
        return f"{self.name}.png"


VLB_TERMS = Curve("vlb_terms", ("t", "term_bpd"), "L_{t-1} (bits/dim)", "where the bound spends its bits")
EPS_MSE_BY_T = Curve("eps_mse_by_t", ("t", "eps_mse"), "‖ε − ε̂‖² / D", "measured ε-space error per t")
EPS_STAR_DISTANCE = Curve(
    "eps_star_distance",
    ("t", "mse_to_eps_star"),
    "‖ε̂ − ε*‖² / D",
    "distance to the optimal denoiser ε* (gmm)",
)
CURVES = (VLB_TERMS, EPS_MSE_BY_T, EPS_STAR_DISTANCE)
IMAGES = (SAMPLE_GRID, *map(sample_grid, SAMPLERS), X0_TRAJECTORY, VLB_TERMS.png, EPS_STAR_DISTANCE.png)


@dataclass(frozen=True)
class Metric:
    """A number in `results.json`'s `metrics`: what it is, and how the report treats it."""

    name: str
    label: str
    kind: str
    ranked: bool = True


METRICS = (
    Metric("nll_vlb_bpd", "NLL from the variational bound (bits/dim)", "nll"),
    Metric("nll_ode_bpd", "NLL from the probability-flow ODE (bits/dim)", "nll"),
    Metric("fd_digits", "Fréchet distance, digits-classifier features", "quality"),
    Metric("fd_mnist", "Fréchet distance, MNIST-classifier features", "quality"),
    Metric("fid", "FID, Inception features", "quality"),
    Metric("kid_digits", "KID, digits-classifier features", "kid"),
    Metric("kid_mnist", "KID, MNIST-classifier features", "kid"),
    Metric("kid", "KID, Inception features", "kid"),
    Metric("eps_star_mse", "MSE of the implied ε to the optimal ε*, log-SNR-spaced t (gmm)", "groundtruth"),
    Metric(
        "eps_star_elbo_bpd", "ELBO-weighted distance to ε*: the bound's reducible part (gmm)", "groundtruth"
    ),
    # The samples' true NLL is best when it matches the data's, not when lowest (collapsing onto
    # the modes lowers it), and the data's own NLL is equal for every arm: shown, never ranked.
    Metric(
        "sample_true_nll_bpd", "True NLL of the samples under the mixture (bits/dim)", "groundtruth", False
    ),
    Metric("nll_exact_bpd", "Exact NLL of the test data under the mixture (bits/dim)", "groundtruth", False),
    Metric("val/vlb_bpd", "Validation VLB, importance-sampled (bits/dim)", "validation"),
    Metric("val/eps_mse", "Validation ε MSE", "validation"),
)
METRIC_INFO = {m.name: m for m in METRICS}
AT = "@"
"""`fd_digits@ddim-10`: a sample metric measured again with another sampler (eval.also_samplers)."""


def metric_at(metric: str, tag: str) -> str:
    return f"{metric}{AT}{tag}"


def base_metric(name: str) -> str:
    """`fd_digits@ddim-10` → `fd_digits`; a name without a sampler tag is its own base."""
    return name.partition(AT)[0]


def metric_info(name: str) -> Metric | None:
    """The registry's entry for a metric, a sampler-tagged one labelled with its sampler."""
    base, _, tag = name.partition(AT)
    info = METRIC_INFO.get(base)
    if info is None or not tag:
        return info
    return Metric(name, f"{info.label}, {tag} samples", info.kind, info.ranked)


def metrics_of_kind(*kinds: str) -> tuple[str, ...]:
    return tuple(m.name for m in METRICS if m.kind in kinds)


NLL_METRICS = metrics_of_kind("nll")
QUALITY_METRICS = metrics_of_kind("quality")
KID_METRICS = metrics_of_kind("kid")
TABLE_METRICS = tuple(m.name for m in METRICS)
NOT_RANKED = tuple(m.name for m in METRICS if not m.ranked)
HEADLINE_METRICS = (*NLL_METRICS, *QUALITY_METRICS, "eps_star_mse", "val/vlb_bpd")


def identity(config: RunSpec | dict) -> dict:
    """The settings that make a run what it is: the resolved config without where it is written or
    logged, the report's margins and the names of the preset and objective group that set it (they
    change no number a run computes), so `experiment=x0_simple` and `head=x0 weighting=own` are one
    trial and any sweep reuses another's finished trials."""
    data = config.resolved if isinstance(config, RunSpec) else config
    kept = {k: v for k, v in data.items() if k not in IDENTITY_EXCLUDES}
    if isinstance(kept.get("objective"), dict):
        kept["objective"] = {k: v for k, v in kept["objective"].items() if k != "name"}
    return kept


def config_hash(spec: RunSpec) -> str:
    """Identity of a trial, as a short hash: equal configs share a trial directory."""
    return hashlib.sha256(json.dumps(identity(spec), sort_keys=True).encode()).hexdigest()[:12]


def flat(data: object, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} → {"a.b": 1}: dotted keys, as on the command line."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, object] = {}
    for key, value in data.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(stored: dict, spec: RunSpec) -> list[str]:
    """`key (there → here)` for every identity setting in which `spec` differs from a stored config."""
    there, here = flat(identity(stored)), flat(identity(spec))
    return [
        f"{key} ({there.get(key, 'unset')!r} there, {here.get(key, 'unset')!r} here)"
        for key in sorted(there.keys() | here.keys())
        if there.get(key, "unset") != here.get(key, "unset")
    ]


def finite_or_none(value: object) -> object:
    """The value with every NaN or infinity replaced by None, so results.json is strict JSON and no
    diverged number passes for a finite one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a checkpoint, loaded with weights_only=True; None when the file
    cannot be read (truncated, corrupt, or not a checkpoint)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # a damaged file raises anything from EOFError to pickle or zip errors
        return None


def trial_dir(spec: RunSpec) -> Path:
    """`<root>/trials/<profile>-<data>/<arm>/s<seed>-<hash>`: one directory per resolved config,
    so a sweep finds its finished and interrupted trials whatever ran them."""
    name = f"s{spec.seed}-{config_hash(spec)}"
    return Path(spec.output.root) / "trials" / f"{spec.profile}-{spec.data.name}" / spec.arm.label / name


def trials_root(trial: Path) -> Path:
    """`<root>/trials/<profile>-<data>` of a trial directory: where a sweep's summary goes."""
    return trial.parents[1]


def runs_root(trial: Path) -> Path:
    """`<root>` of a trial directory: the folder the report scans."""
    return trial.parents[3]


def make_run_dir(spec: RunSpec) -> Path:
    """A fresh `<root>/<experiment>/<timestamp>_s<seed>` (suffixed when the second is taken), `run.dir`,
    or the trial directory (`run.reuse`). DDP workers that Lightning starts (LOCAL_RANK > 0) inherit
    the launcher's through the environment; a launcher never does, so a second run in one process
    cannot fall into the first one's directory."""
    if os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK", "0") != "0":
        return Path(os.environ[RUN_DIR_ENV])
    if spec.output.dir or spec.output.reuse:
        run_dir = Path(spec.output.dir) if spec.output.dir else trial_dir(spec)
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        parent = Path(spec.output.root) / spec.experiment
        parent.mkdir(parents=True, exist_ok=True)
        stem = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_s{spec.seed}"
        for attempt in range(1, 1000):
            run_dir = parent / (stem if attempt == 1 else f"{stem}_{attempt}")
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    return run_dir.resolve()


RESULT_FIELDS: dict[str, tuple[type, str]] = {
    "status": (str, "a string"),
    "metrics": (dict, "an object"),
    "evaluation": (dict, "an object"),
    "budgets": (list, "a list"),
    "optimisation": (dict, "an object"),
}
"""The fields of results.json its readers index, with their JSON type (or null): another is a damaged file."""


def json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


class UnknownSchema(ValueError):
    """A results.json this version cannot read: its schema version is not a known one."""


def upgrade(results: dict) -> dict:
    """A results.json of any schema version, in the current one; UnknownSchema for a version that
    is not an integer from 1 to SCHEMA_VERSION (a newer diffbench's file, or a damaged one)."""
    version = results.get("schema_version", 1)
    if not is_int(version) or not 1 <= version <= SCHEMA_VERSION:
        raise UnknownSchema(
            f"schema_version {version!r} is not one this diffbench reads (1 to {SCHEMA_VERSION}): written by "
            "a newer version, or damaged"
        )
    if version < 2:
        results = dict(results)
        try:
            arm = Arm(results["head"], results["weighting"])
            results.update(weighting=arm.weighting, arm=arm.label)
        except (KeyError, TypeError, ValueError):
            pass  # no usable head and weighting: the reader says so, not the upgrade
        if isinstance(results.get("metrics"), dict) and "eval_wall_time_s" in results["metrics"]:
            metrics = dict(results["metrics"])
            results["eval_wall_time_s"] = metrics.pop("eval_wall_time_s")
            results["metrics"] = metrics
        results["schema_version"] = SCHEMA_VERSION
    return results


class RunDir:
    """A run directory: every path in it, and atomic reads and writes of its files."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_CSV

    def read_config(self) -> dict | None:
        """The stored config.yaml as plain data, unchecked, or None when missing or unreadable: what
        a new run compares its own settings with before it writes here."""
        try:
            config = yaml.safe_load((self.path / CONFIG).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        return config if isinstance(config, dict) else None

    def read_config_or_reason(self) -> tuple[dict | None, str | None]:
        """The stored config.yaml read back through the schema (every value this version reads of
        its type and in its range, renamed values under their new names), or None and why it
        cannot be read; (None, None) when there is none."""
        path = self.path / CONFIG
        if not path.is_file():
            return None, None
        try:
            config = yaml.safe_load(path.read_text())
        except OSError as error:
            return None, f"{CONFIG} cannot be read ({error.strerror or error})"
        except UnicodeDecodeError:
            return None, f"{CONFIG} is not text (damaged or another file under its name)"
        except yaml.YAMLError as error:
            return None, f"{CONFIG} is not valid YAML ({yaml_problem(error)})"
        if not isinstance(config, dict):
            return None, f"{CONFIG} holds a YAML {type(config).__name__}, not a mapping of settings"
        problem = stored_problem(config)
        if problem is not None:
            return None, f"{CONFIG} has {problem}"
        return current_names(config), None

    def write_config(self, spec: RunSpec | dict) -> None:
        """The resolved config, as the run was given it."""
        resolved = spec.resolved if isinstance(spec, RunSpec) else spec
        atomic.write_text(self.path / CONFIG, yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True))

    def read_results(self) -> dict | None:
        """results.json in the current schema, whatever its status; None when missing or broken."""
        return self.read_results_or_reason()[0]

    def read_results_or_reason(self) -> tuple[dict | None, str | None]:
        """results.json in the current schema, or None and why it cannot be read."""
        try:
            results = json.loads((self.path / RESULTS).read_text())
        except OSError as error:
            return None, f"{RESULTS} cannot be read ({error.strerror or error})"
        except ValueError:
            return None, f"{RESULTS} is not valid JSON (half-written or damaged)"
        if not isinstance(results, dict):
            return None, f"{RESULTS} holds a JSON {type(results).__name__}, not an object"
        try:
            results = upgrade(results)
        except UnknownSchema as error:
            return None, f"{RESULTS} unreadable: {error}"
        for key, (kind, name) in RESULT_FIELDS.items():
            if results.get(key) is not None and not isinstance(results[key], kind):
                return (
                    None,
                    f"{RESULTS} unreadable: its {key} is a JSON {json_type(results[key])}, not {name}",
                )
        return results, None

    def complete_results(self) -> dict | None:
        results = self.read_results()
        return results if results is not None and results.get("status") == COMPLETE else None

    def final_results(self) -> dict | None:
        """results.json of a run that is over: complete, or stopped because it diverged."""
        results = self.read_results()
        return results if results is not None and results.get("status") in FINAL else None

    def write_results(self, results: dict) -> None:
        payload = finite_or_none({**results, "schema_version": SCHEMA_VERSION})
        atomic.write_text(
            self.path / RESULTS, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"
        )

    def write_budgets(self, rows: list[dict]) -> None:
        """The per-budget table; columns are the union of the rows' keys, `step` first."""
        columns = ["step", *sorted({k for row in rows for k in row} - {"step"})]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic.write_text(self.path / BUDGETS_CSV, buffer.getvalue())

    def latest_checkpoint(self) -> tuple[Path | None, int, list[Path]]:
        """The checkpoint with the most training steps that loads, its step, and the damaged
        checkpoints passed over (newest first). last.ckpt can lag a step file when a crash came
        between the two writes, so steps decide, not names."""
        candidates = sorted(self.checkpoints.glob("step*.ckpt"), reverse=True)
        last = self.checkpoints / LAST_CHECKPOINT
        damaged: list[Path] = []
        best: tuple[Path | None, int] = (None, 0)
        for path in ([last] if last.is_file() else []) + candidates:
            step = checkpoint_step(path)
            if step is None:
                damaged.append(path)
            elif best[0] is None or step > best[1]:
                best = (path, step)
            if best[0] is not None and path != last:
                break
        return best[0], best[1], damaged

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the directory's lock while writing it. A second writer (two identical sweeps, a
        run started twice) is refused at once rather than interleaving its files with ours."""
        self.path.mkdir(parents=True, exist_ok=True)
        with (self.path / LOCK).open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    f"{self.path} is being written by another diffbench process (it holds {LOCK}). "
                    "Wait for that run to finish, or give this one another run.dir; nothing was written."
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def write_curve(self, curve: Curve, x: list[float], y: list[float]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(curve.columns)
        writer.writerows(zip(x, y))
        atomic.write_text(self.path / curve.csv, buffer.getvalue())

    def read_curve(self, curve: Curve) -> tuple[list[float], list[float]] | None:
        """A two-column curve, or None if absent or broken."""
        try:
            with (self.path / curve.csv).open(newline="") as handle:
                rows = list(csv.reader(handle))[1:]
            return [float(r[0]) for r in rows], [float(r[1]) for r in rows]
        except (OSError, ValueError, IndexError):
            return None


BUDGET_KEYS = ("trainer.max_steps",)
"""The settings in which a run may differ from the finished trial it continues: the training budget.
Nothing else in a resolved config is derived from it (the per-budget steps are computed from it
and `eval.budget_base`, and what training does at a step depends on the step alone)."""
CONTINUED = "continued.json"
"""Which shorter trial a run continued from (results.json's `continued_from`), written before its
training starts, so a continued run that is interrupted and resumed still says where it started."""


@dataclass(frozen=True)
class ShorterTrial:
    """A finished trial of the same arm and seed whose config differs from a run's only in its
    training budget: a run of the longer budget can start from its last checkpoint."""

    run_dir: RunDir
    steps: int
    results: dict


def shorter_trials(spec: RunSpec) -> list[ShorterTrial]:
    """The finished sibling trials (`s<seed>-*` beside the trial directory of `spec`) whose stored
    config equals this one in every setting but BUDGET_KEYS, with a shorter budget, longest first.
    Only trial directories (`run.reuse`) have siblings."""
    if spec.output.dir or not spec.output.reuse:
        return []
    here = trial_dir(spec)
    own = flat(identity(spec))
    unset = object()
    found = []
    for path in sorted(here.parent.glob(f"s{spec.seed}-*")):
        if path.name == here.name or not path.is_dir():
            continue
        run = RunDir(path.resolve())
        config, results = run.read_config(), run.final_results()
        if config is None or results is None:
            continue
        there = flat(identity(config))
        differing = {key for key in own.keys() | there.keys() if own.get(key, unset) != there.get(key, unset)}
        steps = there.get("trainer.max_steps")
        if differing <= set(BUDGET_KEYS) and isinstance(steps, int) and steps < spec.max_steps:
            found.append(ShorterTrial(run, steps, results))
    return sorted(found, key=lambda trial: -trial.steps)


STEP_CHECKPOINT = "step{step:07d}"
"""Lightning's filename pattern of the periodic checkpoints (ModelCheckpoint adds `.ckpt`)."""


def step_checkpoint(step: int) -> str:
    """The periodic checkpoint's file name of a step."""
    return STEP_CHECKPOINT.format(step=step) + ".ckpt"


def write_continuation(run_dir: RunDir, record: dict) -> None:
    atomic.write_json(run_dir / CONTINUED, record)


def read_continuation(run_dir: RunDir) -> dict | None:
    """The record `write_continuation` left, or None (a run that did not continue another)."""
    try:
        record = json.loads((run_dir / CONTINUED).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
