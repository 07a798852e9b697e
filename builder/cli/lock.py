"""CLI stage (the edge of every writing command): one lock file per output folder.

Two runs writing into one folder would share half-written checkpoints and artifacts, so every command that
writes into a folder holds ``<folder>/.build-engine.lock`` while it runs (:func:`claim_output_dir`). The file
names the holder (PID, host, command, start time) and is created atomically with ``O_CREAT | O_EXCL``.
Creating, taking over and removing it happen under an advisory ``flock`` of the folder itself, so two runs
that find the same stale lock cannot both take it over, and a reader never sees a half-written lock. A lock
whose PID no longer runs on this host is stale: the next run takes it over and says so. A lock from another
host cannot be checked and is honoured. The lock is released when the block exits, by an error and by
Ctrl-C included; a killed run (SIGKILL, SIGTERM) leaves a stale lock that the next run takes over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from builder.engine.outputs import check_output_dir, check_output_file
from calib.errors import ConfigError

LOCK_FILE = ".build-engine.lock"


@dataclass(frozen=True, kw_only=True)
class LockHolder:
    """Who holds an output folder: written into the lock file as JSON."""

    pid: int
    host: str
    command: str  # the subcommand, e.g. "calibrate"
    since: str  # local start time, ISO 8601 with seconds and UTC offset

    @classmethod
    def this_process(cls, command: str) -> LockHolder:
        return cls(pid=os.getpid(), host=socket.gethostname(), command=command,
                   since=datetime.now().astimezone().isoformat(timespec="seconds"))

    def describe(self) -> str:
        return f"`build-engine {self.command}` (PID {self.pid} on {self.host}, since {self.since})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True) + "\n"

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """The holder recorded in ``text``; None when it is not a lock this tool wrote. Keys this version does
        not know are ignored: a lock written by another version must still be honoured."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("pid"), int):
            return None
        return cls(pid=data["pid"], host=str(data.get("host", "?")), command=str(data.get("command", "?")),
                   since=str(data.get("since", "?")))


def _running(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def is_stale(holder: LockHolder) -> bool:
    """A lock is stale when it was taken on this host by a process that no longer runs."""
    return holder.host == socket.gethostname() and not _running(holder.pid)


@contextlib.contextmanager
def _folder_guard(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (a directory file descriptor) for a few file operations."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock here (Windows, some network file systems): O_EXCL still holds
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _read(path: Path) -> LockHolder | None:
    return LockHolder.parse(path.read_text(encoding="utf-8", errors="replace"))


def _refusal(folder: Path, holder: LockHolder | None) -> ConfigError:
    lock = folder / LOCK_FILE
    if holder is None:
        return ConfigError(f"output folder {str(folder)!r} holds an unreadable lock file {str(lock)!r}; if no "
                           "build-engine run writes into that folder, delete the file and run again")
    return ConfigError(f"output folder {str(folder)!r} is in use by {holder.describe()}; wait for it to finish or "
                       f"choose another output folder (delete {str(lock)!r} only if that run is gone)")


def _acquire(folder: Path, command: str) -> LockHolder:
    me = LockHolder.this_process(command)
    path = folder / LOCK_FILE
    with _folder_guard(folder):
        for _ in range(2):  # the second try follows the removal of a stale lock
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = _read(path)
                except FileNotFoundError:  # released in between (possible only where flock is unavailable)
                    continue
                if holder is None or not is_stale(holder):
                    raise _refusal(folder, holder) from None
                print(f"build-engine: taking over the stale lock of {holder.describe()} on {str(folder)!r}: "
                      "that process no longer runs", file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(me.to_json())
            except BaseException:  # never leave an empty lock behind (disk full, Ctrl-C)
                path.unlink(missing_ok=True)
                raise
            return me
    raise ConfigError(f"could not take the lock of output folder {str(folder)!r}: other runs keep taking it over; "
                      "run again")


def _release(folder: Path, me: LockHolder) -> None:
    path = folder / LOCK_FILE
    with contextlib.suppress(FileNotFoundError), _folder_guard(folder):
        holder = _read(path)
        if holder == me:
            path.unlink()
        else:
            print(f"build-engine: warning: the lock on {str(folder)!r} is no longer this run's "
                  f"({holder.describe() if holder else 'unreadable'}); left in place", file=sys.stderr)


@contextlib.contextmanager
def output_lock(folder: Path, command: str) -> Iterator[LockHolder]:
    """Hold the lock of the existing ``folder`` for the block; raises ConfigError (exit 2) naming the holder
    when another run holds it."""
    me = _acquire(folder, command)
    try:
        yield me
    finally:
        _release(folder, me)


def _missing(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    path = folder.absolute()
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


@contextlib.contextmanager
def claim_output_dir(folder: Path, command: str, *, parents: bool = False) -> Iterator[Path]:
    """Check ``folder`` as an output folder (exit 2 naming the path and the reason), create it and hold its
    lock for the block. Folders created here that are still empty at the end (a run that failed before
    writing anything) are removed again. ``parents``: missing parents are created, not refused."""
    check_output_dir(folder, parents=parents)
    created = _missing(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with output_lock(folder, command):
            yield folder
    finally:
        for path in created:
            with contextlib.suppress(OSError):  # not empty: the run wrote there, or another run uses it
                path.rmdir()


@contextlib.contextmanager
def claim_output_file(path: Path, command: str) -> Iterator[Path]:
    """Check ``path`` as an output file (exit 2 naming the path and the reason) and hold the lock of its folder
    for the block (it may hold more of the command's outputs, such as a cache)."""
    check_output_file(path)
    with output_lock(path.absolute().parent, command):
        yield path
