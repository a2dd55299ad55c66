"""The import graph of gemminer/ has no cycle.

Every import counts, at the top of a file or inside a function. ``from gemminer.pkg import x`` is an
import of the module ``gemminer.pkg.x`` where that is a module, else of the package ``gemminer.pkg``
(its ``__init__.py``); ``import gemminer.a.b`` is an import of ``gemminer.a.b``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gemminer"


def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def imports_of(name: str, path: Path, package: bool, known: set[str]) -> set[str]:
    """The gemminer modules that the file `path` (module `name`) imports."""

    def nearest(module: str) -> str | None:
        while module and module not in known:
            module = module.rpartition(".")[0]
        return module or None

    here = name if package else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(nearest(alias.name) for alias in node.names if alias.name.split(".")[0] == "gemminer")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "gemminer":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else nearest(target))
    found.discard(None)
    found.discard(name)
    return found  # type: ignore[return-value]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, package, set(known)) for name, (path, package) in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `edges` as a list of nodes (first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_reads_every_kind_of_import():
    edges = graph()
    assert "gemminer.methods.base" in edges["gemminer.methods.imp"]  # from gemminer.methods.base import ...
    assert "gemminer.distributed" in edges["gemminer.methods.base"]  # from gemminer import distributed (a module)
    assert "gemminer" in edges["gemminer.runs"]  # from gemminer import __version__ (inside a function)
    assert "gemminer.datasets" in edges["gemminer.data"]  # inside a function


def test_gemminer_has_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
