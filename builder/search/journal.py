"""Precision search (CLI edge): the journal of evaluated candidates that makes a search resumable.

``journal.jsonl`` in the output folder: a header line naming the inputs the measurements depend on (model,
statistics, base recipe, units, slice, fallback type; not the budget, so a new budget reuses them), then one
:class:`~builder.search.search.Point` per line, appended and flushed as each candidate is measured. A re-run
with the same inputs reads the points back and the search looks them up instead of measuring them again, so it
follows the same path and continues where the last run stopped. A line cut short by a killed run is dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import IO

import msgspec

from builder.search.search import Point
from calib.errors import ConfigError

logger = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
JOURNAL_VERSION = 1


def read_journal(path: Path, inputs: str) -> dict[str, Point]:
    """Points recorded under ``inputs`` (empty when there is no journal or it was made from other inputs)."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header != {"journal": JOURNAL_VERSION, "inputs": inputs}:
        logger.warning("%s was recorded for other inputs; the search starts afresh", path)
        return {}
    points: dict[str, Point] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            point = msgspec.json.decode(line, type=Point)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("%s line %d dropped (%s): a run was cut short while writing it", path, number, exc)
            continue
        points[point.key] = point
    return points


class Journal:
    """Appends points to ``journal.jsonl``; starts a new file (header first) unless ``resume`` keeps it."""

    def __init__(self, path: Path, inputs: str, *, resume: bool) -> None:
        self.path = path
        if path.exists() and not path.is_file():
            raise ConfigError(f"journal {str(path)!r} is not a file")
        keep = resume and self._header_matches(path, inputs)
        self._handle: IO[str] = path.open("a" if keep else "w", encoding="utf-8")
        if not keep:
            self._write(json.dumps({"journal": JOURNAL_VERSION, "inputs": inputs}, sort_keys=True))

    @staticmethod
    def _header_matches(path: Path, inputs: str) -> bool:
        if not path.is_file():
            return False
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        try:
            return bool(json.loads(first) == {"journal": JOURNAL_VERSION, "inputs": inputs})
        except json.JSONDecodeError:
            return False

    def _write(self, line: str) -> None:
        self._handle.write(line + "\n")
        self._handle.flush()

    def add(self, point: Point) -> None:
        if not point.reused:
            self._write(msgspec.json.encode(point).decode("utf-8"))

    def close(self) -> None:
        self._handle.close()
