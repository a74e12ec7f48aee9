"""The layer picture of the library, enforced (issue 26): the import-linter contract in pyproject.toml (run here and
by .ci/run), no import cycle between modules, no private name imported across packages, and small modules."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "backpatch"
#: the most lines a library module may hold (a module over it has more than one job)
MAX_LINES = 450


def test_the_import_linter_contract_holds():
    command = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_every_module_has_a_place_in_the_layers():
    """A new module must be placed in the picture (pyproject.toml), or the contract says nothing about it."""
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    placed = {name.strip() for layer in layers for name in layer.replace(":", "|").split("|")}
    present = {f"backpatch.{p.stem if p.suffix else p.name}" for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert sorted(present - placed) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_form_a_cycle():
    """Module to module, package __init__ re-exports and imports for type checking only left out."""
    graph = grimp.build_graph("backpatch", exclude_type_checking_imports=True)
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if module.startswith(imported + ".") or imported.startswith(module + "."):
                continue  # a package and its own submodules
            if imported.startswith("backpatch"):
                edges.setdefault(module, set()).add(imported)
    assert _cycles(edges) == []


def _package_of(module: str) -> str:
    """``backpatch.methods.contrastive.session`` -> ``backpatch.methods.contrastive``; top-level modules are their
    own package."""
    parts = module.split(".")
    path = PACKAGE.joinpath(*parts[1:])
    return module if path.is_dir() else ".".join(parts[:-1]) if len(parts) > 2 else module


def _private_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        here = module if relative.name == "__init__" else ".".join(module.split(".")[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or node.module is None and node.level == 0:
                continue
            base = here.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            if not source.startswith("backpatch"):
                continue
            for alias in node.names:
                name = alias.name
                target = f"{source}.{name}"
                imported_module = target if PACKAGE.joinpath(*target.split(".")[1:]).with_suffix(".py").exists() or \
                    PACKAGE.joinpath(*target.split(".")[1:]).is_dir() else source
                if name.startswith("_") and not name.startswith("__") and \
                        _package_of(imported_module) != _package_of(module):
                    found.append(f"{module}: from {source} import {name}")
    return found


def test_no_module_imports_a_private_name_of_another_package():
    assert _private_imports() == []


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")))
def test_no_library_module_is_over_the_size_limit(path):
    lines = len((ROOT / path).read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path} has {lines} lines (limit {MAX_LINES}): split it by job"
