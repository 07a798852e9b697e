"""Meta: the wheel ships exactly the packages ``builder``, ``calib`` and ``plugins`` (never ``tests``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"builder", "calib", "plugins"}


IGNORED = shutil.ignore_patterns(".*", "build", "dist", "engines", "*.egg-info", "__pycache__", "*.pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build from a copy of the source tree, so that setuptools' build/ cache never leaks stale files in."""
    source = tmp_path_factory.mktemp("src") / "build-engine"
    shutil.copytree(REPO_ROOT, source, ignore=IGNORED)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=source)
    assert proc.returncode == 0, proc.stderr
    wheels = list(out.glob("build_engine-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_exactly_the_three_rooms(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == SHIPPED
    assert not any(n.startswith("tests/") or "/tests/" in n for n in names)
    for package in SHIPPED:
        assert f"{package}/__init__.py" in names
        assert f"{package}/py.typed" in names


def test_wheel_declares_the_console_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        entry = next(n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = archive.read(entry).decode()
    assert "build-engine = builder.cli.main:main" in text
