"""The import graph of src/ has no cycle: every import counted, also those deferred into a function (a
cycle that only works because one side imports late is still a cycle), read from the sources with `ast`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path("src")


def modules() -> dict[str, Path]:
    """Module name -> file, for every module under src/."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_through_a_deferred_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_of_src_has_no_cycle():
    found = modules()
    if not found:
        pytest.fail("no sources under src/ (the test needs //:src-files)")
    graph = {module: imports(path, set(found)) - {module} for module, path in found.items()}
    assert len(graph) > 40 and graph["driver.train"], "the graph was read"
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"
