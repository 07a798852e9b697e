"""Evaluation stage: the on-disk cache of FP32 reference outputs (one ``.npz`` per model, data and settings).

The key hashes the FP32 model's SHA-256, the tokenizer file's SHA-256, a hash of every evaluation text and
the settings that change the arrays (batch size, lengths, windows, prompts, compared outputs, format
version). A hit is read lazily (one array at a time), so memory stays at one batch; a miss is written once,
atomically (temporary file + rename), after the reference is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from calib.errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when the stored arrays change meaning
PREFIX = "fp32-reference-"


def cache_key(**parts: Any) -> str:
    """SHA-256 of the canonical JSON of ``parts`` (with the cache format)."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def texts_hash(*groups: Any) -> str:
    """SHA-256 over groups of texts (or other JSON-able values), in order."""
    digest = hashlib.sha256()
    for group in groups:
        digest.update(json.dumps(group, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def cache_path(folder: Path, key: str) -> Path:
    return folder / f"{PREFIX}{key[:24]}.npz"


def load_cached(folder: Path | None, key: str) -> Mapping[str, npt.NDArray[Any]] | None:
    """The cached arrays for ``key`` (lazily read), or None when there is no cache or no entry."""
    if folder is None:
        return None
    path = cache_path(folder, key)
    if not path.is_file():
        return None
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable reference cache %s: %s", path, exc)
        return None
    logger.info("reusing the FP32 reference in %s", path)
    return arrays  # type: ignore[no-any-return]


def save_cached(folder: Path | None, key: str, arrays: Mapping[str, npt.NDArray[Any]]) -> Path | None:
    """Write ``arrays`` for ``key`` (atomically); None when no cache folder was given."""
    if folder is None:
        return None
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"reference cache folder {folder} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    path = cache_path(folder, key)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            savez: Any = np.savez  # its stub types **kwargs as its own flags
            savez(handle, **dict(arrays))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote the FP32 reference to %s (%.1f MiB)", path, path.stat().st_size / 2**20)
    return path
