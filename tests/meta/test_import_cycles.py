"""Meta: the import graph of builder/, calib/ and plugins/ has no cycle.

Every runtime import counts, at module level or inside a function (a lazy import that closes a cycle is still
two modules that each need the other); imports under ``if TYPE_CHECKING`` do not. Cycles are the strongly
connected components of more than one module (Tarjan's algorithm).
"""

from __future__ import annotations

from collections.abc import Iterable

from tests.meta.test_import_boundaries import REPO_ROOT, Import, _scan_text, scan_imports

PACKAGES = ("builder", "calib", "plugins")


def _module_of(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _known_modules() -> set[str]:
    modules = set()
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            if "__pycache__" not in path.parts:
                modules.add(_module_of(path.relative_to(REPO_ROOT).as_posix()))
    return modules


def import_graph(imports: Iterable[Import], modules: set[str]) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a import b`` names ``a.b`` when that is a module)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        source = _module_of(imp.path)
        if imp.type_checking_only or source not in graph:
            continue
        for name in imp.names or ("",):
            target = f"{imp.module}.{name}" if name and f"{imp.module}.{name}" in modules else imp.module
            if target in modules and target != source:
                graph[source].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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


def test_the_project_has_no_import_cycle() -> None:
    modules = _known_modules()
    assert {"builder.cli.run", "builder.cli.oneshot", "builder.pipeline"} <= modules
    assert cycles(import_graph(scan_imports(), modules)) == []


def test_a_lazy_cycle_is_found_and_type_checking_imports_are_not_edges() -> None:
    modules = {"builder.a", "builder.b", "builder.c"}
    lazy = [*_scan_text("builder/a.py", "from builder.b import f\n"),
            *_scan_text("builder/b.py", "def g():\n    from builder import a\n"),
            *_scan_text("builder/c.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import builder.a\n")]
    assert cycles(import_graph(lazy, modules)) == [["builder.a", "builder.b"]]
    guard = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import builder.a\n"
    hinted = [*_scan_text("builder/a.py", "from builder.c import x\n"), *_scan_text("builder/c.py", guard)]
    assert cycles(import_graph(hinted, modules)) == []
