"""Output checks shared by every stage that writes to disk (engine build, Triton export and the CLI edge).

A command that writes calls :func:`check_output_dir` (a folder it writes into) or :func:`check_output_file`
(a single file it writes atomically) before any work, so an output that is a file where a folder belongs
(or the reverse), is not writable, or whose parent is missing ends the run with exit 2 naming the path and
the reason -- never with a traceback after minutes of work, and never after a finished build. Checking never
creates anything. The engine build and the Triton export call it too, which is why it lives here and not in
``builder/cli`` (nothing outside the CLI imports the CLI).
"""

from __future__ import annotations

import os
from pathlib import Path

from calib.errors import ConfigError


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def _check_new(path: Path, what: str, *, parents: bool) -> None:
    """``path`` does not exist yet: its parent (or, with ``parents``, its nearest existing ancestor) must be a
    writable folder."""
    if path.is_symlink():
        raise ConfigError(f"{what} {str(path)!r} is a broken symbolic link; remove it or choose another path")
    parent = path.absolute().parent
    if not parents and not parent.exists():
        raise ConfigError(f"{what} {str(path)!r} cannot be created: its parent {str(parent)!r} does not exist")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file")
    if not _writable(parent):
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not writable")


def check_output_dir(path: Path, *, parents: bool = False) -> None:
    """Raise ConfigError (exit 2) unless ``path`` can be written as an output folder.

    It may exist (a writable folder) or not (then its parent must be a writable folder). With
    ``parents=True`` missing parents are allowed (they will be created): the nearest existing ancestor must be
    a writable folder instead.
    """
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"output {str(path)!r} is a file, not a folder; choose another output folder")
        if not _writable(path):
            raise ConfigError(f"output folder {str(path)!r} is not writable")
        return
    _check_new(path, "output folder", parents=parents)


def check_output_file(path: Path, *, parents: bool = False) -> None:
    """Raise ConfigError (exit 2) unless ``path`` can be written (atomically: temp file + rename) as a file.

    An existing regular file is replaced, so it must be writable; a folder or a device is refused. A new file
    needs a writable parent folder (with ``parents=True``: the nearest existing ancestor, the rest is created).
    """
    if path.exists():
        if path.is_dir():
            raise ConfigError(f"output {str(path)!r} is a folder, not a file; give a file name")
        if not path.is_file():
            raise ConfigError(f"output {str(path)!r} is not a regular file; give a file name in a folder")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"output file {str(path)!r} is not writable")
        if not _writable(path.absolute().parent):
            raise ConfigError(f"output file {str(path)!r} cannot be replaced: its folder is not writable")
        return
    _check_new(path, "output file", parents=parents)
