"""Meta: the top-level help and every registered subcommand's ``--help`` exit 0 and print their description."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from builder.cli.main import main
from builder.cli.registry import SUBCOMMANDS


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(["--help"], capsys)
    assert "exit codes" in out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_subcommand_help_prints_its_description(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(SUBCOMMANDS[name])
    help_text = str(module.HELP)
    assert help_text.strip(), f"{SUBCOMMANDS[name]}.HELP is empty"
    out = _help([name, "--help"], capsys)
    assert f"usage: build-engine {name}" in out
    assert help_text.splitlines()[0] in out


def test_no_subcommand_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: build-engine" in capsys.readouterr().out


def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("build-engine")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable} (run `pip install -e .`)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: build-engine")
    assert all(name in proc.stdout for name in SUBCOMMANDS)
