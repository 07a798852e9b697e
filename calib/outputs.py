"""Calibration stage: running the instrumented model for the collector without copying its outputs.

``session.run`` copies every output into a new NumPy array: tens of megabytes of activations per batch. The
OrtValues of ``run_with_ort_values`` are viewed in place instead (the arrays keep them alive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError

Feed = Mapping[str, npt.NDArray[Any]]


def run_unbound(session: Any, names: Sequence[str], feed: Feed) -> list[npt.NDArray[Any]]:
    """``session.run(names, feed)`` without copying the outputs: the arrays view ONNX Runtime's own buffers
    (which they keep alive)."""
    import onnxruntime as ort

    inputs = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
    try:
        values = session.run_with_ort_values(list(names), inputs)
    except Exception as exc:  # ONNX Runtime's Fail, InvalidArgument, RuntimeException: the model cannot run this
        raise model_run_error(feed, exc) from exc
    return [value.numpy() for value in values]


def run_failure(feed: Feed, exc: Exception) -> tuple[str, str]:
    """``(input shapes, reason)`` of an ONNX Runtime run that failed on ``feed``, for an error message."""
    shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feed.items())
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return shapes, reason


def model_run_error(feed: Feed, exc: Exception) -> CalibrationError:
    """The error for a model that ONNX Runtime cannot run on ``feed`` (a broken export, shapes it cannot take)."""
    shapes, reason = run_failure(feed, exc)
    return CalibrationError(f"ONNX Runtime cannot run the model on a calibration batch ({shapes}): {reason}. "
                            "Check that the FP32 model runs in ONNX Runtime on inputs of these shapes")
