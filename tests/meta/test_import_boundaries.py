"""Meta: the room boundaries (README "Layout"), enforced by an AST scan of every source file.

- TensorRT, TensorRT-RTX, Polygraphy and PyCUDA are imported only under ``builder/`` and in
  ``plugins/*/plugin.py``, and there only lazily (inside a function), never at module level;
- OpenAI Triton is imported only in ``plugins/*/kernel.py``, ``plugins/*/plugin.py``, ``bench/`` and ``tests/``,
  or lazily (inside a function) by other ``plugins/`` modules such as the ahead-of-time compile driver;
- ``calib/`` never imports ``builder`` and takes from ``plugins`` only the ``plugins.<name>.schema`` modules;
- ``plugins/`` never imports ``builder``.
Test code (``tests/``) is exempt from the TensorRT rule: GPU tests may drive a backend directly.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("builder", "calib", "plugins", "bench", "tests")
TENSORRT_FAMILY = frozenset({"tensorrt", "tensorrt_rtx", "polygraphy", "pycuda"})


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repo root, with forward slashes
    line: int
    module: str  # fully qualified imported module (``from a import b`` -> "a")
    names: tuple[str, ...]  # names taken with ``from ... import``
    in_function: bool
    type_checking_only: bool


class _Visitor(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.depth = 0
        self.type_checking = 0
        self.found: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    # ast.NodeVisitor dispatches on these names
    visit_FunctionDef = _function
    visit_AsyncFunctionDef = _function
    visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        guard = isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        guard |= isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"
        self.type_checking += guard
        for child in node.body:
            self.visit(child)
        self.type_checking -= guard
        for child in node.orelse:
            self.visit(child)

    def _add(self, node: ast.stmt, module: str, names: tuple[str, ...]) -> None:
        self.found.append(Import(self.path, node.lineno, module, names, self.depth > 0, self.type_checking > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name, ())

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node, node.module, tuple(a.name for a in node.names))


def _sources() -> Iterator[Path]:
    for room in SCANNED:
        base = REPO_ROOT / room
        if base.is_dir():
            yield from sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)


@functools.cache
def scan_imports() -> list[Import]:
    found: list[Import] = []
    for path in _sources():
        rel = path.relative_to(REPO_ROOT).as_posix()
        visitor = _Visitor(rel)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=rel))
        found.extend(visitor.found)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def _is_plugin_file(path: str, name: str) -> bool:
    parts = path.split("/")
    return len(parts) == 3 and parts[0] == "plugins" and parts[2] == name


def _targets(imp: Import) -> list[str]:
    """Modules an import may bind: ``from plugins.x import schema`` also names ``plugins.x.schema``."""
    return [imp.module, *(f"{imp.module}.{n}" for n in imp.names)]


def tensorrt_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if _top(imp.module) not in TENSORRT_FAMILY or imp.type_checking_only or imp.path.startswith("tests/"):
            continue
        allowed_file = imp.path.startswith("builder/") or _is_plugin_file(imp.path, "plugin.py")
        if not allowed_file:
            bad.append(f"{imp.path}:{imp.line} imports {imp.module}; only builder/ and plugins/*/plugin.py may")
        elif not imp.in_function:
            bad.append(f"{imp.path}:{imp.line} imports {imp.module} at module level; import it inside a function")
    return bad


def triton_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        if _top(imp.module) != "triton" or imp.type_checking_only:
            continue
        allowed = imp.path.startswith(("bench/", "tests/"))
        allowed |= _is_plugin_file(imp.path, "kernel.py") or _is_plugin_file(imp.path, "plugin.py")
        allowed |= imp.path.startswith("plugins/") and imp.in_function
        if not allowed:
            bad.append(
                f"{imp.path}:{imp.line} imports triton; only plugins/*/kernel.py, plugin.py, bench/, tests/ may "
                "(other plugins/ modules only inside a function)"
            )
    return bad


def room_violations(imports: list[Import]) -> list[str]:
    bad = []
    for imp in imports:
        room = imp.path.split("/")[0]
        if room in ("calib", "plugins") and _top(imp.module) == "builder":
            bad.append(f"{imp.path}:{imp.line} imports {imp.module}; {room}/ must not import builder")
        if room == "calib" and _top(imp.module) == "plugins":
            schema = [t for t in _targets(imp) if len(t.split(".")) == 3 and t.endswith(".schema")]
            if not schema:
                bad.append(f"{imp.path}:{imp.line} imports {imp.module}; calib/ may import only plugins.<name>.schema")
    return bad


def test_tensorrt_is_imported_only_lazily_in_builder_and_plugin_files() -> None:
    assert tensorrt_violations(scan_imports()) == []


def test_triton_is_imported_only_in_kernels_plugins_bench_and_tests() -> None:
    assert triton_violations(scan_imports()) == []


def test_calib_and_plugins_never_import_builder() -> None:
    assert room_violations(scan_imports()) == []


def test_scan_sees_this_repository() -> None:
    imports = scan_imports()
    assert any(i.path == "builder/cli/main.py" and i.module == "builder.cli.registry" for i in imports)


def _scan_text(path: str, text: str) -> list[Import]:
    visitor = _Visitor(path)
    visitor.visit(ast.parse(text))
    return visitor.found


@pytest.mark.parametrize(
    ("path", "text", "check", "expected_bad"),
    [
        ("calib/x.py", "import tensorrt\n", tensorrt_violations, 1),
        ("builder/x.py", "import tensorrt\n", tensorrt_violations, 1),  # module level
        ("builder/x.py", "def f():\n    import tensorrt as trt\n", tensorrt_violations, 0),
        ("builder/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tensorrt\n",
         tensorrt_violations, 0),
        ("plugins/ln/plugin.py", "def f():\n    from polygraphy import backend\n", tensorrt_violations, 0),
        ("plugins/ln/reference.py", "def f():\n    import pycuda\n", tensorrt_violations, 1),
        ("plugins/ln/kernel.py", "import triton\n", triton_violations, 0),
        ("plugins/aot.py", "def f():\n    import triton\n", triton_violations, 0),
        ("plugins/aot.py", "import triton\n", triton_violations, 1),
        ("calib/x.py", "def f():\n    import triton\n", triton_violations, 1),
        ("calib/x.py", "from builder.graph import report\n", room_violations, 1),
        ("calib/x.py", "from plugins.ln.schema import OP\n", room_violations, 0),
        ("calib/x.py", "from plugins.ln import schema\n", room_violations, 0),
        ("calib/x.py", "from plugins.ln import kernel\n", room_violations, 1),
        ("plugins/ln/schema.py", "import builder\n", room_violations, 1),
    ],
)
def test_rules_flag_exactly_the_bad_imports(path: str, text: str, check: object, expected_bad: int) -> None:
    assert callable(check)
    assert len(check(_scan_text(path, text))) == expected_bad
