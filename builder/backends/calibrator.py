"""Engine-build stage: feed our calibration cache to TensorRT 10's implicit-INT8 calibrator interface.

TensorRT never re-calibrates here: ``get_batch`` hands out no data, and ``read_calibration_cache`` returns
our cache with its header rewritten for the running TensorRT version (a mismatched header makes TensorRT
discard the cache and calibrate on its own). The logic lives in :class:`CacheCalibrator`, a plain class
testable without TensorRT; :func:`make_trt_calibrator` wraps it in a ``trt.IInt8EntropyCalibrator2``
subclass created lazily. Reading and writing the cache text is :mod:`calib.cache`'s job.

Cache format (calib/cache.py)::

    TRT-<version>-EntropyCalibration2
    <tensor name>: <8 hex digits = big-endian float32 scale (amax / 127)>
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from calib.cache import CalibrationCache, format_cache, parse_cache, tensorrt_header
from calib.errors import CalibrationError, ConfigError

logger = logging.getLogger(__name__)

ALGORITHM = "EntropyCalibration2"


class CacheCalibrator:
    """TensorRT's calibrator contract, answered from a cache we computed (no data is ever fed)."""

    def __init__(self, cache_text: str, *, trt_version: str, batch_size: int = 1) -> None:
        if batch_size < 1:
            raise ConfigError(f"calibration batch size {batch_size} must be >= 1")
        source = parse_cache(cache_text)
        if source.algorithm != ALGORITHM:
            raise CalibrationError(
                f"calibration cache algorithm {source.algorithm!r} is not {ALGORITHM!r}; the cache's scales "
                "are fed through an entropy-2 calibrator, so write it with that header"
            )
        if not source.scales:
            raise CalibrationError("calibration cache has a header but no tensor scales")
        self.source_header = source.header
        version = ".".join(trt_version.split(".")[:3])  # 10.13.0.35 -> 10.13.0
        self.cache = CalibrationCache(header=tensorrt_header(version, ALGORITHM), scales=source.scales)
        self._text = format_cache(self.cache)
        self._batch_size = batch_size
        self.batches_requested = 0
        self.cache_reads = 0
        self.written: bytes | None = None

    @property
    def header(self) -> str:
        return self.cache.header

    def get_batch_size(self) -> int:
        return self._batch_size

    def get_batch(self, names: Iterable[str]) -> list[int] | None:
        """No calibration data: ``None`` tells TensorRT the data is exhausted (it must use the cache)."""
        self.batches_requested += 1
        logger.warning("TensorRT asked for calibration batches for %s; it should have read the cache", list(names))
        return None

    def read_calibration_cache(self) -> bytes:
        self.cache_reads += 1
        return self._text.encode("utf-8")

    def write_calibration_cache(self, cache: bytes) -> None:
        """TensorRT hands back the table it used; keep it for inspection, never overwrite our file."""
        self.written = bytes(cache)

    def missing(self, tensors: Iterable[str]) -> list[str]:
        """Tensors without a scale in the cache (TensorRT runs their layers in higher precision)."""
        return [t for t in tensors if t not in self.cache.scales]


def make_trt_calibrator(trt: Any, core: CacheCalibrator) -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` forwarding every call to ``core`` (TensorRT 10 only)."""
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise ConfigError(
            f"TensorRT {trt.__version__} has no calibrator interface (removed in 11); use explicit Q/DQ instead"
        )

    class _EntropyCalibrator2(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()  # the base __init__ must be called explicitly (pybind11 trampoline)
            self.core = core

        def get_batch_size(self) -> int:
            return core.get_batch_size()

        def get_batch(self, names: list[str], *_: Any) -> list[int] | None:
            return core.get_batch(names)

        def read_calibration_cache(self) -> bytes:
            return core.read_calibration_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            core.write_calibration_cache(bytes(cache))

        def get_algorithm(self) -> Any:
            return trt.CalibrationAlgoType.ENTROPY_CALIBRATION_2

    return _EntropyCalibrator2()
