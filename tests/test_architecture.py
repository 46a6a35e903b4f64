"""The layout rules of docs/ARCHITECTURE.md, checked on the source: the imports inside
``nbflow/`` form no cycle, the engine knows no notebook, and the step protocol does not
know who runs it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nbflow"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (any import, also under TYPE_CHECKING
    or inside a function), resolved to modules: ``from nbflow import codec`` is an
    edge to ``nbflow.codec``.  Importing a package's ``__init__`` through a submodule
    is not counted (Python runs it first for every submodule anyway)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "nbflow":
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_imports_inside_the_package_form_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_names_a_cycle_when_there_is_one(tmp_path: Path) -> None:
    pkg = tmp_path / "nbflow"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from nbflow import b\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nbflow.c import X\n"
    )
    (pkg / "c.py").write_text("def f():\n    from . import a\n")
    assert find_cycle(import_graph(pkg)) == ["nbflow.a", "nbflow.b", "nbflow.c", "nbflow.a"]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        # the engine is the product; the notebook layer is its face
        ("nbflow.engine", "nbflow.notebook"),
        ("nbflow.runner", "nbflow.notebook"),
        ("nbflow.worker", "nbflow.notebook"),
        # the step protocol does not know who runs it
        ("nbflow.step", "nbflow.runner"),
        ("nbflow.step", "nbflow.worker"),
        ("nbflow.step", "nbflow.engine"),
        # runs and workers get a Backend, never the engine
        ("nbflow.runner", "nbflow.engine"),
        ("nbflow.worker", "nbflow.engine"),
    ],
)
def test_layers_do_not_reach_upwards(module: str, forbidden: str) -> None:
    graph = import_graph()
    reached = {m for m in graph[module] if m == forbidden or m.startswith(forbidden + ".")}
    assert not reached, f"{module} imports {sorted(reached)}"


def test_the_notebook_layer_uses_no_private_engine_members() -> None:
    offenders = []
    for path in sorted((PACKAGE / "notebook").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Attribute | ast.Name)
                and (getattr(node.value, "attr", None) or getattr(node.value, "id", ""))
                in ("engine", "_engine", "inst", "instance", "backend")
            ):
                offenders.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not offenders, offenders
