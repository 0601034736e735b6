"""The import graph follows the layers of README.md "Architecture": each layer imports only layers below it.

From the bottom: core (config, storage, paths, runtime, the data contract) -> ingestion -> features ->
trainers -> serving -> devtools (generator, local Kafka) -> lsvcr flows (pipeline, demo, continuous, suite,
jobs) -> benchmarks -> lsvcr.cli. Modules of one layer may import each other. A project import inside a
function body is allowed only in lsvcr.cli, where it keeps `lsvcr --help` fast.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("core", "ingestion", "features", "trainers", "serving", "devtools", "lsvcr", "benchmarks", "lsvcr.cli")
LAZY_IMPORTS_ALLOWED = ("lsvcr.cli",)


def layer_of(module: str, layers: tuple[str, ...] = LAYERS) -> int | None:
    """Index of the most specific layer that `module` belongs to, None for third-party modules."""
    best = None
    for i, prefix in enumerate(layers):
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(layers[best]):
                best = i
    return best


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(root: Path, name: str) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(root: Path, tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement; `from pkg import mod` counts
    as an import of pkg.mod when mod is a module of the tree."""
    found = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(node) for fn in functions for node in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([node.module] if node.module else []))
            names = sorted({f"{base}.{a.name}" if _is_module(root, f"{base}.{a.name}") else base for a in node.names})
        else:
            continue
        found += [(name, node.lineno, id(node) in nested) for name in names]
    return found


def violations(root: Path, layers: tuple[str, ...] = LAYERS,
               lazy_allowed: tuple[str, ...] = LAZY_IMPORTS_ALLOWED) -> list[str]:
    """Every import of a higher layer, and every function-body project import outside `lazy_allowed`."""
    problems = []
    tops = {layer.split(".")[0] for layer in layers}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] not in tops:
            continue
        module = _module_name(path, root)
        own = layer_of(module, layers)
        for name, line, lazy in _imports(root, ast.parse(path.read_text()), module, path.name == "__init__.py"):
            target = layer_of(name, layers)
            if target is None:
                continue
            if target > own:
                problems.append(f"{rel}:{line}: {module} ({layers[own]}) imports {name} ({layers[target]})")
            if lazy and layer_of(module, lazy_allowed) is None:
                problems.append(f"{rel}:{line}: {module} imports {name} inside a function")
    return problems


def test_the_project_follows_its_layers():
    assert violations(ROOT) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_reports_an_import_of_a_higher_layer(tmp_path):
    root = _tree(tmp_path, {
        "core/__init__.py": "",
        "core/config.py": "import json\nfrom trainers.evaluate import evaluate\n",
        "trainers/__init__.py": "",
        "trainers/evaluate.py": "from core import config\nfrom . import metrics\n",
        "trainers/metrics.py": "",
    })
    found = violations(root, layers=("core", "trainers"))
    assert found == ["core/config.py:2: core.config (core) imports trainers.evaluate (trainers)"]


def test_checker_reports_a_relative_import_of_a_higher_layer(tmp_path):
    root = _tree(tmp_path, {"lsvcr/__init__.py": "", "lsvcr/cli.py": "", "lsvcr/flow.py": "from . import cli\n"})
    found = violations(root, layers=("lsvcr", "lsvcr.cli"), lazy_allowed=())
    assert found == ["lsvcr/flow.py:1: lsvcr.flow (lsvcr) imports lsvcr.cli (lsvcr.cli)"]


def test_checker_reports_project_imports_inside_functions(tmp_path):
    root = _tree(tmp_path, {
        "core/__init__.py": "",
        "trainers/__init__.py": "",
        "core/config.py": "",
        "trainers/a.py": "def f():\n    import json\n    from core import config\n",
        "lsvcr/__init__.py": "",
        "lsvcr/cli.py": "def main():\n    from trainers import a\n",
    })
    found = violations(root, layers=("core", "trainers", "lsvcr", "lsvcr.cli"))
    assert found == ["trainers/a.py:3: trainers.a imports core.config inside a function"]


def test_layer_of_takes_the_most_specific_prefix():
    assert layer_of("lsvcr.cli") == LAYERS.index("lsvcr.cli")
    assert layer_of("lsvcr.pipeline") == LAYERS.index("lsvcr")
    assert layer_of("trainers.models.sr") == LAYERS.index("trainers")
    assert layer_of("ray.train") is None
    assert layer_of("lsvcr_extra") is None
