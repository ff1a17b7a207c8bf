"""The shape of the code base: no import cycles in the package, no module over 400 lines, the
benchmark scripts within 600 lines, test modules that share helpers through conftest.py only."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the package modules it imports}, leaving out imports under
    `if __name__ == "__main__":` (they run only when the file is the program)."""
    graph = {}
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in tree.body if isinstance(node, ast.If)
                   and "__main__" in ast.unparse(node.test) for n in ast.walk(node)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skipped or not isinstance(node, ast.ImportFrom):
                continue
            if node.module in (root.name, f"{root.name}.data", f"{root.name}.models"):
                deps |= {f"{node.module}.{a.name}" for a in node.names}
            elif node.module and node.module.startswith(root.name):
                deps.add(node.module)
        graph[_module_name(path)] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for dep in sorted(graph[module] & graph.keys()):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    assert cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = import_graph(REPO / "dwise_jax")
    assert "dwise_jax.experiment" in graph["dwise_jax.predict"]  # the graph sees imports
    assert cycles(graph) == []


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "dwise_jax").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_test_modules_share_helpers_through_conftest_only():
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_"):
                offenders.append(f"{path.name} imports {node.module}")
    assert offenders == []


def test_benchmark_scripts_stay_within_600_lines():
    total = sum(len(p.read_text().splitlines()) for p in (REPO / "benchmarks").glob("*.py"))
    assert total <= 600, total
