"""pyproject.toml declares every package that importing flor_lightning needs."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _module_level_imports(tree: ast.Module) -> set[str]:
    """Top-level names imported when the module loads (not in functions, not under TYPE_CHECKING)."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_every_package_imported_at_load_time_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_canonical(Requirement(r).name) for r in project["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for file in sorted((ROOT / "flor_lightning").glob("*.py")):
        for module in _module_level_imports(ast.parse(file.read_text())):
            if module in sys.stdlib_module_names or module in ("__future__", "flor_lightning"):
                continue
            names = {_canonical(d) for d in distributions.get(module, [module])}
            if not names & declared:
                undeclared[f"{file.name}: import {module}"] = sorted(names)
    assert undeclared == {}
