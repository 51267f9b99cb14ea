"""The package's layers: imports go one way, nothing imports the commands, and only the
run-directory contract spells the run directory's file names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "diffbench"
# Lower layers never import higher ones. `cli` and the `python -m diffbench.<name>` shims are the top.
LAYERS = {
    "cli": 7,
    "tuned": 6,
    "until": 6,
    "launch": 5,
    "plan": 4,
    "pipeline": 4,
    "bench": 4,
    "train": 3,
    "evaluation": 3,
    "analysis": 3,
    "sampling": 2,
    "rundir": 2,
    "spec": 2,
    "schema": 2,
    "rules": 2,
    "core": 1,
    "data": 1,
    "config": 0,
    "tracking": 0,
    "atomic": 0,
    "seeding": 0,
}
SHIMS = {"run", "evaluate", "sweep", "report", "dashboard", "bench"}


def module_name(path: Path) -> str:
    return ".".join(("diffbench", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """Every diffbench module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffbench"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("diffbench"))
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: {d for d in imports_of(path) if d in MODULES and d != name} for name, path in MODULES.items()}


def layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    if part in SHIMS and module in (f"diffbench.{part}", f"diffbench.{part}.__main__"):
        return LAYERS["cli"]
    return LAYERS.get(part, 0)


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = [
        m for m in MODULES if m != "diffbench" and m.split(".")[1] not in LAYERS | dict.fromkeys(SHIMS)
    ]
    assert not unplaced


def test_no_import_cycles() -> None:
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module: str) -> None:
    """cli → train/evaluation/analysis → sampling/rundir → core/data; no module outside the
    commands imports `cli`, and `analysis` never imports `train`."""
    wrong = [dep for dep in GRAPH[module] if layer(dep) > layer(module) and dep != "diffbench"]
    if module.startswith("diffbench.analysis"):
        wrong += [dep for dep in GRAPH[module] if dep.startswith("diffbench.train")]
    same_layer = [
        dep
        for dep in GRAPH[module]
        if layer(dep) == layer(module) == 3 and dep.split(".")[1] != module.split(".")[1]
    ]
    assert not wrong and not same_layer


def test_samplers_and_likelihoods_never_see_a_head_or_a_weighting() -> None:
    """`sampling/` takes a callable (x_t, t) → ε̂: it imports no head and no weighting."""
    for module in (m for m in MODULES if m.startswith("diffbench.sampling")):
        assert not {
            d for d in GRAPH[module] if d.startswith(("diffbench.core.heads", "diffbench.core.weightings"))
        }


def test_only_the_builder_and_the_commands_read_a_config_tree() -> None:
    """Past `spec.build_spec`, settings travel as typed values: omegaconf is imported by the
    config composer, the spec builder and the commands alone."""
    readers = {
        m for m, path in MODULES.items() if re.search(r"^\s*(from|import) omegaconf", path.read_text(), re.M)
    }
    assert readers <= {"diffbench.config", "diffbench.spec"} | {
        m for m in MODULES if m.startswith("diffbench.cli")
    }


def test_architecture_page_names_every_module() -> None:
    """docs/architecture.md lists every file under src/diffbench by its name."""
    page = (ROOT.parents[1] / "docs" / "architecture.md").read_text()
    missing = [
        str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if p.name != "__init__.py" and p.name not in page
    ]
    assert not missing


RUN_FILES = re.compile(
    r"""["'](results\.json|config\.yaml|metrics\.csv|last\.ckpt|sweep\.log|checkpoints)["']"""
)


# The same words naming other things: the package's own base config, torch hub's weight folder.
NOT_RUN_FILES = {"diffbench.config": {"config.yaml"}, "diffbench.evaluation.fidelity": {"checkpoints"}}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "diffbench.rundir"))
def test_only_rundir_spells_run_directory_file_names(module: str) -> None:
    spelled = set(RUN_FILES.findall(MODULES[module].read_text()))
    assert not spelled - NOT_RUN_FILES.get(module, set())


def test_the_checker_sees_a_wrong_way_import(tmp_path: Path) -> None:
    """The test above can fail: a core module importing cli is caught by `layer`."""
    assert layer("diffbench.cli.run") > layer("diffbench.core.heads")
    assert layer("diffbench.run") == layer("diffbench.cli.run")
    source = tmp_path / "bad.py"
    source.write_text("from diffbench.cli.run import main\n")
    assert imports_of(source) == {"diffbench.cli.run", "diffbench.cli.run.main"}
