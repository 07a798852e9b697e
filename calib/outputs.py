"""Calibration stage: running the instrumented model for the collector without copying its outputs.

``session.run`` copies every output into a new NumPy array: tens of megabytes of activations per batch. The
OrtValues of ``run_with_ort_values`` are viewed in place instead (the arrays keep them alive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Feed = Mapping[str, npt.NDArray[Any]]


def run_unbound(session: Any, names: Sequence[str], feed: Feed) -> list[npt.NDArray[Any]]:
    """``session.run(names, feed)`` without copying the outputs: the arrays view ONNX Runtime's own buffers
    (which they keep alive)."""
    import onnxruntime as ort

    inputs = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in feed.items()}
    return [value.numpy() for value in session.run_with_ort_values(list(names), inputs)]
