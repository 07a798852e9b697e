"""Calibration stage (shared with the builder): an ONNX file's graph read without its external weight data.

Every reader of a user's model file goes through :func:`read_graph`, so a file that is not ONNX (or is cut
short) is one :class:`GraphError` (exit 3) naming the file, whichever command met it first.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from calib.errors import GraphError


def read_graph(path: Path) -> onnx.ModelProto:
    """The model in ``path``, tensors kept in external data left as references; GraphError when unreadable."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, ValueError, OSError and others
        raise GraphError(f"cannot read the ONNX model {str(path)!r} (truncated or not ONNX): {exc}") from exc
