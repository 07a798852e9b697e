"""Profiling stage: the LatencyReport artifact and trtexec-style statistics.

Statistics follow trtexec's ``sampleReporting.cpp``: samples sorted ascending; the median is the middle
sample (mean of the two middle ones for an even count); percentile p is the sample at index
``max(n - 1 - floor((1 - p/100) * n), 0)`` (in float32). Latency = host-to-device + compute + device-to-host; throughput
is inferences per second of host wall time over the timed loop.

The LatencyReport is a frozen, versioned msgspec Schema (calib.schema): decoding rejects unknown keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import numpy as np

from calib.errors import InternalError
from calib.schema import Schema, decode_json, to_json

LATENCY_REPORT_VERSION = 2  # 2: strict schema; ``sequences_per_s`` is derived, no longer stored
PERCENTILES = (90.0, 95.0, 99.0)

Flag = str | int | float | bool | None  # a value in LatencyResult.flags


def trtexec_percentile(sorted_ms: Sequence[float], percentile: float) -> float:
    """Percentile exactly as trtexec picks it from ascending samples."""
    if not sorted_ms:
        raise InternalError("percentile of no samples")
    n = len(sorted_ms)
    f32 = np.float32  # trtexec computes (1 - p / 100) * n in float: 1 - 0.99f leaves 0.0099999905
    exclude = int((f32(1.0) - f32(percentile) / f32(100.0)) * f32(n))
    return float(sorted_ms[max(n - 1 - exclude, 0)])


def trtexec_median(sorted_ms: Sequence[float]) -> float:
    n = len(sorted_ms)
    if n % 2:
        return float(sorted_ms[n // 2])
    return (float(sorted_ms[n // 2 - 1]) + float(sorted_ms[n // 2])) / 2.0


class LatencyStats(Schema, frozen=True, kw_only=True):
    """min/max/mean/median/p90/p95/p99 in milliseconds, and the coefficient of variation."""

    count: int
    min_ms: float
    max_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    cv: float  # standard deviation / mean

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> LatencyStats:
        if not samples_ms:
            raise InternalError("latency statistics of no samples")
        ordered = sorted(float(s) for s in samples_ms)
        mean = math.fsum(ordered) / len(ordered)
        std = math.sqrt(math.fsum((s - mean) ** 2 for s in ordered) / len(ordered))
        return cls(
            count=len(ordered),
            min_ms=ordered[0],
            max_ms=ordered[-1],
            mean_ms=mean,
            median_ms=trtexec_median(ordered),
            p90_ms=trtexec_percentile(ordered, 90.0),
            p95_ms=trtexec_percentile(ordered, 95.0),
            p99_ms=trtexec_percentile(ordered, 99.0),
            cv=std / mean if mean > 0 else 0.0,
        )


class LatencyResult(Schema, frozen=True, kw_only=True):
    """One model on one runtime at one input shape."""

    label: str  # preset or model name shown in plots
    runtime: str  # onnxruntime-cpu | onnxruntime-cuda | tensorrt
    runtime_version: str
    model: str
    batch: int
    seq: int
    warmup_ms: float
    latency: LatencyStats  # end to end: h2d + compute + d2h
    compute: LatencyStats
    h2d: LatencyStats | None = None  # None where the runtime has no separate transfer (CPU)
    d2h: LatencyStats | None = None
    throughput_qps: float  # inferences per second of wall time
    flags: dict[str, Flag] = msgspec.field(default_factory=dict)  # every setting that affects the numbers

    @property
    def sequences_per_s(self) -> float:
        """Sequences per second (``throughput_qps * batch``)."""
        return self.throughput_qps * self.batch


class LatencyReport(Schema, frozen=True, kw_only=True):
    """Every measured point of one profiling run, plus what was skipped and why."""

    results: tuple[LatencyResult, ...]
    skipped: tuple[str, ...] = ()
    host: dict[str, str] = msgspec.field(default_factory=dict)
    version: int = LATENCY_REPORT_VERSION

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); :meth:`from_json` reads it back equal."""
        return to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> LatencyReport:
        """Decode a report; a wrong version, an unknown key or a bad value raises ConfigError."""
        return decode_json(text, cls, "latency report", version=LATENCY_REPORT_VERSION)
