"""The package's plan, checked: folders by seam import only the folders before them, and modules stay small.

    core < quant < trace < adapt < io < multi      (sharding.py, at the root, imports core only)

A module over 400 lines, or a function over 60 (after its docstring), needs a stated reason here.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "jlora"
ORDER = ["core", "quant", "trace", "adapt", "io", "multi"]
ROOT_MODULES = {"sharding": {"core"}}  # what each root module may import
MAX_LINES = 400
MAX_FUNCTION = 60
LONG_MODULES: dict[str, str] = {}
LONG_FUNCTIONS: dict[str, str] = {}


def _modules() -> list[pathlib.Path]:
    return sorted(p for p in PKG.rglob("*.py"))


def _folder(path: pathlib.Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else rel[0][:-3]


def _imported_folders(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "jlora" and len(parts) > 1 and (parts[1] in ORDER or parts[1] in ROOT_MODULES):
                out.add(parts[1])
    return out


@pytest.mark.parametrize("path", [p for p in _modules() if p.name != "__init__.py" or p.parent != PKG],
                         ids=lambda p: str(p.relative_to(PKG)))
def test_imports_run_down_the_folders(path):
    folder = _folder(path)
    allowed = ROOT_MODULES.get(folder) or set(ORDER[: ORDER.index(folder) + 1])
    above = _imported_folders(path) - allowed - {folder}
    assert not above, f"jlora/{path.relative_to(PKG)} ({folder}) imports {sorted(above)}, above it in {ORDER}"


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines after its docstring."""
    body = node.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return node.end_lineno - body[0].lineno + 1


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for path in _modules():
        rel = str(path.relative_to(PKG))
        text = path.read_text()
        if len(text.splitlines()) > MAX_LINES and rel not in LONG_MODULES:
            long_modules.append(f"{rel}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node)
                if n > MAX_FUNCTION and f"{rel}:{node.name}" not in LONG_FUNCTIONS:
                    long_functions.append(f"{rel}:{node.name}: {n}")
    assert not long_modules and not long_functions, (long_modules, long_functions)
