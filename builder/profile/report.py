"""Profiling stage: the LatencyReport artifact and trtexec-style statistics.

Statistics follow trtexec's ``sampleReporting.cpp``: samples sorted ascending; the median is the middle
sample (mean of the two middle ones for an even count); percentile p is the sample at index
``max(n - 1 - floor((1 - p/100) * n), 0)`` (in float32). Latency = host-to-device + compute + device-to-host; throughput
is inferences per second of host wall time over the timed loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from calib.artifact_io import canonical_json, versioned_object
from calib.errors import ConfigError, InternalError

LATENCY_REPORT_VERSION = 1
PERCENTILES = (90.0, 95.0, 99.0)


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


@dataclass(frozen=True, kw_only=True)
class LatencyStats:
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyStats:
        return cls(
            count=int(data["count"]),
            min_ms=float(data["min_ms"]),
            max_ms=float(data["max_ms"]),
            mean_ms=float(data["mean_ms"]),
            median_ms=float(data["median_ms"]),
            p90_ms=float(data["p90_ms"]),
            p95_ms=float(data["p95_ms"]),
            p99_ms=float(data["p99_ms"]),
            cv=float(data["cv"]),
        )


@dataclass(frozen=True, kw_only=True)
class LatencyResult:
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
    flags: Mapping[str, Any] = field(default_factory=dict)  # every setting that affects the numbers

    @property
    def sequences_per_s(self) -> float:
        return self.throughput_qps * self.batch

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "model": self.model,
            "batch": self.batch,
            "seq": self.seq,
            "warmup_ms": self.warmup_ms,
            "latency": self.latency.to_dict(),
            "compute": self.compute.to_dict(),
            "h2d": None if self.h2d is None else self.h2d.to_dict(),
            "d2h": None if self.d2h is None else self.d2h.to_dict(),
            "throughput_qps": self.throughput_qps,
            "sequences_per_s": self.sequences_per_s,
            "flags": dict(self.flags),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyResult:
        def stats(key: str) -> LatencyStats | None:
            return None if data.get(key) is None else LatencyStats.from_dict(data[key])

        latency, compute = stats("latency"), stats("compute")
        if latency is None or compute is None:
            raise ConfigError("latency result lacks 'latency' or 'compute' statistics")
        return cls(
            label=str(data["label"]),
            runtime=str(data["runtime"]),
            runtime_version=str(data["runtime_version"]),
            model=str(data["model"]),
            batch=int(data["batch"]),
            seq=int(data["seq"]),
            warmup_ms=float(data["warmup_ms"]),
            latency=latency,
            compute=compute,
            h2d=stats("h2d"),
            d2h=stats("d2h"),
            throughput_qps=float(data["throughput_qps"]),
            flags=dict(data.get("flags", {})),
        )


@dataclass(frozen=True, kw_only=True)
class LatencyReport:
    """Every measured point of one profiling run, plus what was skipped and why."""

    results: tuple[LatencyResult, ...]
    skipped: tuple[str, ...] = ()
    host: Mapping[str, str] = field(default_factory=dict)
    version: int = field(default=LATENCY_REPORT_VERSION)

    def to_json(self) -> str:
        data = {
            "version": self.version,
            "host": dict(self.host),
            "skipped": list(self.skipped),
            "results": [r.to_dict() for r in self.results],
        }
        return canonical_json(data)

    @classmethod
    def from_json(cls, text: str) -> LatencyReport:
        data = versioned_object(text, "latency report", LATENCY_REPORT_VERSION)
        return cls(
            results=tuple(LatencyResult.from_dict(r) for r in data["results"]),
            skipped=tuple(data.get("skipped", ())),
            host=dict(data.get("host", {})),
        )
