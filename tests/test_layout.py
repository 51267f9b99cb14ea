"""The package's layers: imports go one way, nothing imports the commands, and only the
run-directory contract spells the run directory's file names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "diffbench"
PAGE = ROOT.parents[1] / "docs" / "architecture.md"
SHIMS = {"run", "evaluate", "sweep", "report", "dashboard", "bench"}
CLI_LINES = 1000


def diagram_layers(page: str) -> dict[str, int]:
    """The layers of docs/architecture.md's "Imports go one way" diagram, bottom row 0: the test
    reads the page, so the page and the rule it states cannot drift apart."""
    section = page.split("## Imports go one way", 1)[1]
    block = section.split("```", 2)[1]
    rows = [re.sub(r"\(.*?\)", "", line).split() for line in block.splitlines()]
    rows = [row for row in rows if row and row != ["↓"]]
    return {name: len(rows) - 1 - i for i, row in enumerate(rows) for name in row}


# Lower layers never import higher ones. `cli` and the `python -m diffbench.<name>` shims are the top.
LAYERS = diagram_layers(PAGE.read_text())


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


def test_the_diagram_has_every_part_once_and_cli_on_top() -> None:
    page = PAGE.read_text()
    block = page.split("## Imports go one way", 1)[1].split("```", 2)[1]
    names = re.sub(r"\(.*?\)|↓", " ", block).split()
    assert len(names) == len(set(names)) == len(LAYERS)
    assert LAYERS["cli"] == max(LAYERS.values()) and list(LAYERS.values()).count(LAYERS["cli"]) == 1
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir() if p.suffix == ".py" or p.is_dir()}
    parts = {p for p in parts if not p.startswith("__") and p not in ("conf",)} - SHIMS
    assert parts <= set(LAYERS), "a part of the package missing from the diagram"


def wrong_way(module: str) -> list[str]:
    """The imports of `module` that go up a layer, or sideways to another part of its own layer."""
    part = module.split(".")[1] if "." in module else ""
    return [
        dep
        for dep in GRAPH[module]
        if dep != "diffbench"
        and (layer(dep) > layer(module) or (layer(dep) == layer(module) and dep.split(".")[1] != part))
        and not (layer(module) == LAYERS["cli"] and layer(dep) == LAYERS["cli"])
    ]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module: str) -> None:
    """Every layer of the diagram, bottom to top: a module imports its own part of the package and
    the layers below it, never a layer above and never another part of its own layer (so
    `analysis` never imports `train`, `sampling` never imports `rundir`)."""
    assert not wrong_way(module)


def test_nothing_outside_the_commands_imports_them() -> None:
    importers = {
        m
        for m, deps in GRAPH.items()
        if any(d == "diffbench.cli" or d.startswith("diffbench.cli.") for d in deps)
    }
    shims = {f"diffbench.{name}" for name in SHIMS} | {f"diffbench.{name}.__main__" for name in SHIMS}
    assert importers <= shims | {m for m in MODULES if m.startswith("diffbench.cli")}


def test_the_commands_stay_thin() -> None:
    """`cli/` holds arguments, messages and exit codes: at most 1,000 lines in all."""
    lines = sum(len(p.read_text().splitlines()) for p in (ROOT / "cli").rglob("*.py"))
    assert lines <= CLI_LINES, f"cli/ has {lines} lines"


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
    page = PAGE.read_text()
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
    # Sideways in a lower layer is caught as well: `core` and `data` share a layer.
    assert layer("diffbench.core.heads") == layer("diffbench.data.digits")
    GRAPH["diffbench.core.heads"].add("diffbench.data.digits")
    try:
        assert wrong_way("diffbench.core.heads") == ["diffbench.data.digits"]
    finally:
        GRAPH["diffbench.core.heads"].discard("diffbench.data.digits")


def test_the_diagram_is_read_bottom_up() -> None:
    page = "## Imports go one way\n\n```\ncli (and shims)\n  ↓\na    b\n  ↓\nc\n```\n"
    assert diagram_layers(page) == {"cli": 2, "a": 1, "b": 1, "c": 0}
