"""Meta: the READMEs' examples stay true. Every recipe YAML block (one with ``name:`` and ``rules:``) loads as a
recipe, and every ``build-engine ...`` command line in a code block parses with the real argument parser (its
subcommand and flags exist and take the values shown)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

READMES = ("README.md", "builder/recipes/README.md")
_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(path: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in _BLOCK.finditer((REPO_ROOT / path).read_text(encoding="utf-8"))]


def _commands(text: str) -> list[str]:
    """Command lines (continued lines joined) that start with ``build-engine``, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = []
    for line in joined.splitlines():
        line = " ".join(line.split(" #", 1)[0].split())
        placeholder = any(mark in line for mark in ("...", "<", "$", "[", "|"))  # a usage pattern, not a command
        if line.startswith("build-engine ") and not placeholder:
            lines.append(line)
    return lines


RECIPE_BLOCKS = [(path, text) for path in READMES for lang, text in _blocks(path)
                 if lang == "yaml" and re.search(r"^name:", text, re.MULTILINE) and "rules:" in text]
COMMANDS = [(path, line) for path in READMES for lang, text in _blocks(path) if lang in ("", "bash", "sh")
            for line in _commands(text)]


def test_the_readmes_have_examples() -> None:
    assert RECIPE_BLOCKS and len(COMMANDS) >= 10


@pytest.mark.parametrize(("path", "text"), RECIPE_BLOCKS, ids=[f"{p}#{i}" for i, (p, _) in enumerate(RECIPE_BLOCKS)])
def test_recipe_examples_load(path: str, text: str) -> None:
    from builder.recipes.loader import recipe_from_yaml

    recipe_from_yaml(text, where=path)


@pytest.mark.parametrize(("path", "line"), COMMANDS, ids=[f"{p}:{line[13:50]}" for p, line in COMMANDS])
def test_command_examples_parse(path: str, line: str) -> None:
    from builder.cli.main import _normalize_argv, build_parser

    argv = _normalize_argv(shlex.split(line)[1:])
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse reports a bad flag or value by exiting 2
        pytest.fail(f"{path}: `{line}` does not parse (exit {exc.code})")


def test_the_extractor_sees_continued_lines() -> None:
    assert _commands("build-engine build m.onnx \\\n    --arch sm86  # c\nmake demo\n") == [
        "build-engine build m.onnx --arch sm86"]
    assert Path(REPO_ROOT / READMES[0]).is_file()
