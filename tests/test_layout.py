"""The package's import graph: no module imports one that imports it back when the
package loads (docs/contributing.md lists the imports that reach across layers, and why)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "collafuse_hpc"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at load time: top-level imports, not
    those inside functions (loaded on use) or under ``if TYPE_CHECKING`` (hints only);
    ``from pkg import sub`` is an import of the module pkg.sub."""
    graph = {}
    for path in package.rglob("*.py"):
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            for n in ast.walk(node):
                if isinstance(n, ast.Import):
                    deps |= {a.name for a in n.names if a.name.startswith(package.name)}
                elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith(package.name):
                    subs = {f"{n.module}.{a.name}" for a in n.names}
                    files = package.parent.joinpath(*n.module.split("."))
                    found = {s for s in subs if (files / f"{s.rsplit('.', 1)[1]}.py").exists()}
                    deps |= found or {n.module}
        graph[_module(path)] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle found by a depth-first walk, each as the modules around it."""
    found, state = [], {}

    def walk(module: str, stack: list[str]) -> None:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep) :] + [dep])
            elif dep in graph and dep not in state:
                walk(dep, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    return found


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert len(graph) > 50 and "collafuse_hpc.report.stats" in graph["collafuse_hpc.report.make"]
    assert "collafuse_hpc.config" not in graph["collafuse_hpc.config_rules"]  # a type hint only
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
