"""Config composition with Hydra's command line (`experiment=eps_simple data=digits
trainer.max_steps=500`) over plain OmegaConf YAML. Group defaults and the built-in experiment
presets live in the package's `conf/`, so a non-editable install finds them; user presets are
found in `$DIFFBENCH_EXPERIMENTS` and `./experiments` first. The merge order is written at the
top of `conf/config.yaml`."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).parent / "conf"
GROUPS = ("data", "model", "objective", "trainer")
"""Groups whose file fills `cfg.<group>`; a `profile` file is merged at the top level instead."""
GLOBAL_SECTION = "_global_"
"""A group file's section merged at the top level, e.g. trainer=gpu turning on speed.compile."""
SHORTCUTS = {"head": "objective.head", "weighting": "objective.weighting"}


class ConfigError(ValueError):
    """A bad command line or config file; its message says what to do instead."""


def experiment_dirs() -> list[Path]:
    """Where experiment presets are looked up, first match wins: `$DIFFBENCH_EXPERIMENTS`,
    `./experiments` of the working directory, then the package's built-in `conf/experiment`."""
    env = os.environ.get("DIFFBENCH_EXPERIMENTS")
    user = [Path(env)] if env else []
    return [*user, Path.cwd() / "experiments", CONF_DIR / "experiment"]


def group_dirs(group: str) -> list[Path]:
    return experiment_dirs() if group == "experiment" else [CONF_DIR / group]


def available(group: str) -> list[str]:
    return sorted({p.stem for folder in group_dirs(group) for p in folder.glob("*.yaml")})


def find_choice(group: str, name: str) -> Path | None:
    """The group's file of that name, or None (also for a name no file system could hold)."""
    try:
        return next((d / f"{name}.yaml" for d in group_dirs(group) if (d / f"{name}.yaml").is_file()), None)
    except (OSError, ValueError):
        return None


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML parser error on one line: what was wrong and where (its own text spans several)."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(error, 'problem', None) or 'not valid YAML'}{where}"


def is_name(name: object) -> bool:
    """A file's name without its folder: nothing that could reach outside the folder it is looked up in."""
    return (
        isinstance(name, str)
        and bool(name)
        and not any(c in name for c in "/\\")
        and not name.startswith((".", "~"))
    )


def load_choice(group: str, name: str) -> DictConfig:
    """A group's file by name (a name, never a path), as a mapping of settings."""
    if not is_name(name):
        raise ConfigError(
            f"{group}={name!r} is not a name: {group}= takes the name of a YAML file in "
            f"{' or '.join(str(d) for d in group_dirs(group))}, without a path or .yaml "
            f"(e.g. {group}={available(group)[0] if available(group) else '…'}); "
            "to use your own file, put it there."
        )
    path = find_choice(group, name)
    if path is None:
        folders = " or ".join(str(d) for d in group_dirs(group))
        options = ", ".join(available(group)) or "none"
        raise ConfigError(
            f"unknown {group} {name!r}. Available {group} choices: {options}. "
            f"Pick one of them (e.g. {group}={available(group)[0] if available(group) else '…'}) "
            f"or add {name}.yaml to {folders}."
        )
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"{path} is not valid YAML ({yaml_problem(error)}); fix the file or pick another {group}."
        ) from error
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"{path} holds a YAML {type(loaded).__name__.replace('Config', '').lower()}, not a mapping of "
            "settings (key: value lines such as `optim: {lr: 2.0e-4}`); "
            f"fix the file or pick another {group}."
        )
    return loaded


def parse_value(raw: str, key: str = "") -> object:
    """YAML scalars and lists, plus numbers YAML 1.1 leaves as strings (`2e-4`)."""
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        raise ConfigError(
            f"cannot read the value of {key or 'an argument'}={raw!r} ({yaml_problem(error)}); "
            "write a number, a word, or a list in brackets such as [1,2,2], and quote text that holds "
            "brackets or colons."
        ) from error
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(args: list[str]) -> tuple[dict[str, str], list[tuple[str, object]]]:
    """Split `key=value` arguments into group choices and dotted-key value overrides."""
    choices: dict[str, str] = {}
    values: list[tuple[str, object]] = []
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.lstrip("-")
        if not sep or not key:
            raise ConfigError(
                f"cannot read argument {arg!r}: arguments are key=value pairs, e.g. "
                "experiment=eps_simple trainer.max_steps=500 seed=3"
            )
        if key in (*GROUPS, "experiment", "profile"):
            choices[key] = raw
        elif key in SHORTCUTS:
            values.append((SHORTCUTS[key], parse_value(raw, key)))
        else:
            values.append((key, parse_value(raw, key)))
    return choices, values


def known_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, DictConfig):
            keys.extend(known_keys(value, path + "."))
    return keys


def apply_value(cfg: DictConfig, key: str, value: object, source: str | None = None) -> None:
    """Set one dotted key, refusing a key the config does not have (with the nearest ones named)
    and a value for a whole group of settings. `source` names the preset it came from. The value
    itself is judged by the schema when the spec is built (`schema.validate`), the one type check."""
    add = key.startswith("+") and source is None
    key = key.lstrip("+")
    where = f" in {source}" if source else ""
    missing = object()
    old = OmegaConf.select(cfg, key, default=missing)
    if old is missing and not add:
        close = difflib.get_close_matches(key, known_keys(cfg), n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown config key {key!r}{where}.{hint} Check the spelling; README's 'Configuration' "
            "section lists the knobs."
        )
    if isinstance(old, DictConfig):
        raise ConfigError(
            f"{key} is a group of settings ({', '.join(old.keys())}); "
            f"set one of them, e.g. {key}.{next(iter(old.keys()))}=…"
        )
    OmegaConf.update(cfg, key, value, force_add=True)


def leaves(data: object, prefix: str = "") -> list[tuple[str, object]]:
    """{"a": {"b": 1}} → [("a.b", 1)]; lists are values, not branches."""
    if not isinstance(data, dict) or not data:
        return [(prefix, data)] if prefix else []
    return [
        item
        for key, value in data.items()
        for item in leaves(value, f"{prefix}.{key}" if prefix else str(key))
    ]


def preset_settings(name: str) -> list[tuple[str, object]]:
    """The dotted settings an experiment preset writes ([] when there is no such preset)."""
    if find_choice("experiment", name) is None:
        return []
    return leaves(OmegaConf.to_container(load_choice("experiment", name)))


def compose(args: list[str]) -> DictConfig:
    """The resolved run config for a command line."""
    choices, values = parse_overrides(args)
    cfg = OmegaConf.load(CONF_DIR / "config.yaml")
    defaults = OmegaConf.to_container(cfg.pop("defaults"))
    experiment = None
    if "experiment" in choices:
        experiment = load_choice("experiment", choices["experiment"])
        preset_defaults = OmegaConf.to_container(experiment.pop("defaults", OmegaConf.create()))
        if not isinstance(preset_defaults, dict) or not set(preset_defaults) <= set(GROUPS):
            raise ConfigError(
                f"experiment {choices['experiment']}: its defaults: must map groups to names "
                f"(e.g. `defaults: {{data: gmm, model: unet_small}}`, groups {', '.join(GROUPS)}); "
                "a Hydra-style list or another key is not read."
            )
        defaults.update(preset_defaults)
    defaults.update({k: v for k, v in choices.items() if k != "experiment"})
    global_sections = []
    for group in GROUPS:
        cfg[group] = load_choice(group, defaults[group])
        global_sections.append(cfg[group].pop(GLOBAL_SECTION, OmegaConf.create()))
        cfg[group]["name"] = defaults[group]
    cfg = OmegaConf.merge(cfg, *global_sections)
    profile = choices.get("profile", cfg.profile)
    cfg = OmegaConf.merge(cfg, load_choice("profile", profile))
    cfg.profile = profile
    if experiment is not None:
        source = f"preset {choices['experiment']}"
        for key, value in leaves(OmegaConf.to_container(experiment)):
            apply_value(cfg, key, value, source)
        cfg.experiment = choices["experiment"]
    for key, value in values:
        apply_value(cfg, key, value)
    return cfg
