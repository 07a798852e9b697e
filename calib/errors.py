"""Error families shared by every stage (all rooms import from here).

User errors derive from :class:`ToolkitError` and carry the CLI exit code:
0 ok, 2 usage or config, 3 graph or calibration, 4 build, 5 missing optional backend.
:class:`InternalError` is a bug in this project and deliberately does not derive from ToolkitError.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ToolkitError(Exception):
    """The user can fix this: bad input, config or environment."""

    exit_code: int = 2


class ConfigError(ToolkitError):
    """A flag, recipe, override or argument is invalid (exit 2)."""

    exit_code = 2


class GraphError(ToolkitError):
    """The ONNX model cannot be read or analysed (exit 3)."""

    exit_code = 3


class CalibrationError(ToolkitError):
    """Calibration data or statistics are unusable (exit 3)."""

    exit_code = 3


class BuildError(ToolkitError):
    """Lowering or engine building failed (exit 4)."""

    exit_code = 4


class BackendUnavailable(ToolkitError):
    """An optional backend (TensorRT, TensorRT-RTX, a GPU) is not installed here (exit 5)."""

    exit_code = 5


class InternalError(Exception):
    """A bug in this project. Deliberately not a ToolkitError."""


def suggest(name: str, known: Iterable[str], n: int = 3) -> str:
    """Return a ``"; did you mean 'x'?"`` suffix naming close matches of ``name`` in ``known``."""
    matches = difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"
