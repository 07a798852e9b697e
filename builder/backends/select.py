"""Engine-build stage: choose a backend by name (``auto`` prefers full TensorRT, then TensorRT-RTX)."""

from __future__ import annotations

import logging

from builder.backends.base import EngineBackend
from builder.backends.options import BackendName
from calib.errors import BackendUnavailable

logger = logging.getLogger(__name__)


def select_backend(name: BackendName) -> EngineBackend:
    """Instantiate the backend ``name``; BackendUnavailable (exit 5) says how to install a missing one."""
    from builder.backends.rtx import RtxBackend, rtx_available
    from builder.backends.tensorrt import TensorRTBackend, tensorrt_available

    if name is BackendName.TENSORRT:
        return TensorRTBackend()
    if name is BackendName.TENSORRT_RTX:
        return RtxBackend()
    if tensorrt_available():
        try:
            backend: EngineBackend = TensorRTBackend()
        except BackendUnavailable as exc:  # installed, but no usable GPU or driver
            if not rtx_available():
                raise
            logger.warning("backend auto: full TensorRT is installed but unusable here (%s); using TensorRT-RTX", exc)
            return RtxBackend()
        logger.info("backend auto: using full TensorRT")
        return backend
    if rtx_available():
        logger.info("backend auto: full TensorRT is not installed; using TensorRT-RTX")
        return RtxBackend()
    raise BackendUnavailable(
        "no engine builder is installed: `pip install 'build-engine[rtx]'` for TensorRT-RTX (CPU builds) or "
        "'build-engine[tensorrt]' for full TensorRT"
    )
