"""Artifact plumbing: atomic writes leave either the old or the new file, never a temporary one."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from calib.artifact_io import atomic_write_bytes, atomic_write_json, canonical_json, read_json


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]


def test_atomic_write_uses_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "m.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.bin").stat().st_mode) == 0o644


def test_failed_serialization_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    atomic_write_json(target, {"b": 1, "a": [1.5]})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"x": float("nan")})
    assert read_json(target) == {"a": [1.5], "b": 1}
    assert canonical_json({"b": 1, "a": 2}) == '{\n  "a": 2,\n  "b": 1\n}\n'


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (a folder no file can be made in)")
def test_a_refused_write_names_the_target_not_the_temporary_file() -> None:
    target = Path("/proc/build-engine-artifact.json")
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"{}")
    assert caught.value.filename == str(target)
    assert "cannot write here" in str(caught.value)
