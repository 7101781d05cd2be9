"""The package's import drawing: arrows point one way (no cycle among module-level imports),
errors live in one module, and the tests' oracle (:mod:`flwr_fedtan.reference`) stands on
the core alone, not on the client it checks."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "flwr_fedtan"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules ``path`` imports, at module level or inside functions (imports under
    ``if TYPE_CHECKING`` never run and are left out)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_checking = {id(node) for block in ast.walk(tree)
                     if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                     for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
            found.update(submodules or {target})
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules - {name}


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_imports_form_no_cycle():
    assert _cycles(_import_graph()) == []


def test_errors_import_nothing_of_the_package():
    assert _import_graph()["flwr_fedtan.errors"] == set()


def test_the_reference_stands_on_the_core_alone():
    every_import = {node.module for node in ast.walk(ast.parse((PACKAGE / "reference.py").read_text()))
                    if isinstance(node, ast.ImportFrom)}  # type-checking imports too
    assert "client" not in every_import and "flwr_fedtan.client" not in every_import
    root = PACKAGE.parent
    code = ("import sys, flwr_fedtan.reference; "
            "print(sorted(m for m in sys.modules if m in ('flwr', 'flwr_fedtan.client') or m.startswith('flwr.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_no_module_is_over_about_400_lines():
    long = {path.stem: n for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long
