"""The layering docs/ARCHITECTURE.md promises, checked on the source: allowed imports, one owner
of the ditopt annotations, and module and function sizes a reader can hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = [ROOT / "ditopt", ROOT / "passes", ROOT / "runtime"]
HARNESSES = ("ditopt/bench", "ditopt/graphdiff", "ditopt/zoo")


def python_files(*roots: Path):
    for root in roots:
        yield from sorted(root.rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what ``path`` imports, relative imports resolved against its package."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("passes", "runtime"):
        parts = ["ditopt", *parts]
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return found


def test_the_runtime_imports_nothing_from_the_compiler_above_it():
    for path in python_files(ROOT / "runtime"):
        outside = {m for m in imported_modules(path) if m.startswith("ditopt") and not m.startswith("ditopt.runtime")}
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


def test_passes_know_no_api_backend_plan_or_harness():
    banned = ("ditopt.api", "ditopt.backend", "ditopt.plan", "ditopt.resolve", "ditopt.bench", "ditopt.graphdiff",
              "ditopt.demo", "ditopt.cli", "ditopt.profile", "ditopt.tune", "ditopt.planner")
    for path in python_files(ROOT / "passes"):
        bad = {m for m in imported_modules(path) if m.startswith(banned)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_core_never_imports_a_harness():
    for path in python_files(*CORE):
        rel = str(path.relative_to(ROOT))
        if rel.startswith(HARNESSES) or rel in ("ditopt/cli.py", "ditopt/demo.py"):
            continue
        bad = {m for m in imported_modules(path) if m.startswith(("ditopt.bench", "ditopt.graphdiff", "ditopt.demo"))}
        assert not bad, f"{rel} imports {sorted(bad)}"


def test_only_the_annotation_module_touches_meta_ditopt():
    pattern = re.compile(r'meta\["ditopt"\]|meta\.get\("ditopt"')
    offenders = [str(p.relative_to(ROOT)) for p in python_files(*CORE) if pattern.search(p.read_text())]
    assert offenders == ["passes/annotations.py"], offenders


def code_lines(lines: list[str], fn: ast.FunctionDef) -> int:
    body = fn.body
    doc = None
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = (body[0].lineno, body[0].end_lineno)
    return sum(1 for i in range(fn.lineno, fn.end_lineno + 1)
               if not (doc and doc[0] <= i <= doc[1]) and lines[i - 1].strip()
               and not lines[i - 1].strip().startswith("#"))


@pytest.mark.parametrize("path", [p for p in python_files(*CORE)
                                  if not str(p.relative_to(ROOT)).startswith(HARNESSES)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_under_500_lines_and_functions_under_80_lines_of_code(path):
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) <= 500, f"{len(lines)} lines"
    long = [f"{fn.name} ({code_lines(lines, fn)})" for fn in ast.walk(ast.parse(text))
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(lines, fn) > 80]
    assert long == []
