"""The package layers: no import cycles, and no module importing a layer above its own.

Layers, lowest first: utils < datasets, models < evaluation < training < the command line
(`train.py` and `evaluation/run.py`, which turns parsed arguments into an evaluation). Every
import is read from the source with `ast`, including imports inside functions, so a deferred
import cannot hide a cycle.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "datasets", "models", "evaluation", "training")
LAYER = {"utils": 0, "datasets": 1, "models": 1, "evaluation": 2, "training": 3, "cli": 4}
CLI_MODULES = {"train", "evaluation.run", "evaluation.export_run"}


def project_modules() -> dict:
    """Module name -> source path of every project module (train.py, and packages' modules at any depth).

    A sub-package is a module of its own, its `__init__.py` (`evaluation.scorers`), so that
    `from evaluation.scorers import X` counts as importing it.
    """
    modules = {"train": ROOT / "train.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
                if len(parts) == 1:  # a top-level package's (empty) __init__.py: no module of its own
                    continue
            modules[".".join(parts)] = path
    return modules


def imported_project_modules(path: Path, modules: dict) -> set:
    """Project modules imported anywhere in the file at `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in modules)
    return found


def layer_of(module: str) -> int:
    """The layer number of a project module."""
    return LAYER["cli"] if module in CLI_MODULES else LAYER[module.split(".")[0]]


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: imported_project_modules(path, modules) - {name} for name, path in modules.items()}
    state: dict = {}
    cycles = []

    def visit(name, trail):
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(trail[trail.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


@pytest.mark.parametrize("module", sorted(project_modules()))
def test_no_module_imports_a_layer_above_its_own(module):
    modules = project_modules()
    above = sorted(dep for dep in imported_project_modules(modules[module], modules)
                   if layer_of(dep) > layer_of(module))
    assert above == [], f"{module} (layer {layer_of(module)}) imports {above}"


def test_sub_packages_are_looked_into(tmp_path):
    modules = project_modules()
    assert modules["evaluation.scorers.base"] == ROOT / "evaluation" / "scorers" / "base.py"
    assert modules["evaluation.scorers"] == ROOT / "evaluation" / "scorers" / "__init__.py"
    source = tmp_path / "probe.py"
    source.write_text("from evaluation.scorers import SCORERS\nfrom evaluation.scorers import base\n"
                      "import training.state\n")
    assert imported_project_modules(source, modules) == {"evaluation.scorers", "evaluation.scorers.base",
                                                         "training.state"}
    assert layer_of("evaluation.scorers.base") == LAYER["evaluation"]
