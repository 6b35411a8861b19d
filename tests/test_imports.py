"""The architecture as the imports show it, checked by parsing them (ast), not by importing:

- the direction search -> cxr_model -> datasets: no arrow against it, module-level or inside a function
- only search/ imports ray.tune
- no import cycle between the project's modules (e.g. cli.py <-> demo.py)
- `cxr --help` loads none of keras, tensorflow, jax, ray, optuna (they are imported lazily)
- an import inside a function is of a heavy module: never the standard library nor a light project module
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("cxr_datasets", "cxr_model", "cxr_search")  # each may import only those before it
# import name -> folder (pyproject.toml's package-dir: the folders keep their short names)
FOLDERS = {"cxr_datasets": "datasets", "cxr_model": "cxr_model", "cxr_search": "search"}
HEAVY = ("keras", "tensorflow", "jax", "ray", "optuna")


def _modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in sorted((ROOT / FOLDERS[package]).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            out[name] = path
    return out


MODULES = _modules()


def _package_names(package: str) -> dict[str, str]:
    """name -> defining submodule, for names a package's __init__ re-exports (eagerly or via _EXPORTS)."""
    tree = ast.parse(MODULES[package].read_text())
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{package}.{node.module}"
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            for key, value in zip(node.value.keys, node.value.values):
                names[key.value] = f"{package}.{value.value}"
    return names


def _imports(module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in `module`, relative ones resolved; a name taken
    from a project package counts as an import of the submodule that defines it."""
    path = MODULES[module]
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in MODULES:
                    found.append((node.lineno, full))  # `from cxr_search import commands`
                elif base in LAYERS and alias.name in _package_names(base):
                    found.append((node.lineno, _package_names(base)[alias.name]))
                else:
                    found.append((node.lineno, base))
    return found


def _layer(module: str) -> int | None:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def test_the_parser_sees_the_imports_it_checks():
    assert any(m == "cxr_datasets.errors" for _, m in _imports("cxr_model.config"))
    assert any(m == "cxr_model.data" for _, m in _imports("cxr_search.shared_data"))  # `from cxr_model import Data`
    assert any(m == "cxr_model.train" for _, m in _imports("cxr_model.finalize"))  # a lazy one
    assert any(m == "cxr_search.demo" for _, m in _imports("cxr_search.cli"))


def test_no_import_against_search_cxr_model_datasets():
    wrong = []
    for module in MODULES:
        for line, target in _imports(module):
            if _layer(target) is not None and _layer(target) > _layer(module):
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against search -> cxr_model -> datasets:\n" + "\n".join(wrong)


def test_only_search_imports_ray_tune():
    wrong = [f"{MODULES[m].relative_to(ROOT)}:{line}" for m in MODULES if not m.startswith("cxr_search")
             for line, target in _imports(m) if target == "ray.tune" or target.startswith("ray.tune.")]
    assert not wrong, wrong


def test_no_import_cycles_between_project_modules():
    graph = {m: {t for _, t in _imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ imports its submodules, which may take names from the package: not a cycle
    for module, targets in graph.items():
        graph[module] = {t for t in targets if t not in LAYERS}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# project modules that load nothing heavy: imported at module level wherever they are used
LIGHT_PROJECT = {"cxr_datasets.errors", "cxr_datasets.config", "cxr_datasets.storage", "cxr_datasets.versions",
                 "cxr_model.config", "cxr_model.quiet", "cxr_search.config", "cxr_search.space"}


def _function_level_imports(module: str) -> list[tuple[int, str]]:
    tree = ast.parse(MODULES[module].read_text())
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return [(line, m) for line, m in _imports(module) if any(
        getattr(n, "lineno", None) == line and id(n) in inside for n in ast.walk(tree))]


def test_imports_inside_functions_are_of_heavy_modules_only():
    light = []
    for module in MODULES:
        for line, imported in _function_level_imports(module):
            if imported.split(".")[0] in sys.stdlib_module_names or imported in LIGHT_PROJECT:
                light.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {imported} inside a function")
    assert not light, "import these at module level (docs/DESIGN.md):\n" + "\n".join(light)


def test_a_function_level_light_import_would_be_found(monkeypatch):
    source = MODULES["cxr_model.serve"].read_text() + "\n\ndef _late():\n    import json\n    from cxr_datasets.errors import CxrError\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    found = [m for _, m in _function_level_imports("cxr_model.serve")]
    assert "json" in found and "cxr_datasets.errors" in found


def test_a_cycle_would_be_found(monkeypatch):
    real = _imports
    monkeypatch.setitem(globals(), "_imports",
                        lambda m: real(m) + ([(1, "cxr_search.cli")] if m == "cxr_search.demo" else []))
    with pytest.raises(AssertionError, match="cxr_search.cli -> cxr_search.demo -> cxr_search.cli"):
        test_no_import_cycles_between_project_modules()


def test_cxr_help_loads_no_heavy_framework():
    code = ("import sys; from cxr_search.main import build_parser; build_parser().format_help();"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
