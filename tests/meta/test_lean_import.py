"""Meta: importing the packages and ``build-engine --help`` load no heavy backend (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# never loaded by `import calib` / `import builder` / `import plugins`
HEAVY = ("torch", "tensorrt", "tensorrt_rtx", "triton", "transformers", "polygraphy", "pycuda")
# additionally kept out of `build-engine --help` (CLI modules import these inside `run`)
HEAVY_FOR_HELP = (*HEAVY, "onnxruntime", "matplotlib", "sklearn")

_PROBE = """
import contextlib, io, json, sys
heavy = {heavy!r}
{body}
print("@@" + json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def _loaded_after(body: str, heavy: tuple[str, ...]) -> list[str]:
    """Run ``body`` in a fresh interpreter; return which of ``heavy`` ended up in sys.modules."""
    code = _PROBE.format(heavy=heavy, body=body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("@@"))
    loaded: list[str] = json.loads(line[2:])
    return loaded


@pytest.mark.parametrize("package", ["calib", "builder", "plugins"])
def test_import_package_is_lean(package: str) -> None:
    assert _loaded_after(f"import {package}", HEAVY) == []


def test_help_is_lean() -> None:
    body = (
        "from builder.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
    )
    assert _loaded_after(body, HEAVY_FOR_HELP) == []


def test_probe_detects_a_heavy_import() -> None:
    """The probe itself works: a module on the watch list that does get imported is reported."""
    assert _loaded_after("import numpy", ("numpy",)) == ["numpy"]
