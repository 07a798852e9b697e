"""Profiling stage: ONNX Runtime latency (CPU, and CUDA where its provider is present).

Warm-up runs for ``warmup_ms`` (at least one run), then at least ``iterations`` timed runs and at least
``duration_s`` seconds. On the CPU the host wall time of ``run`` is the compute time (there are no
transfers). On CUDA, inputs are copied to the device, bound with I/O binding and outputs copied back, so
host-to-device, compute and device-to-host are timed apart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.profile.report import LatencyResult, LatencyStats
from calib.errors import BackendUnavailable, ConfigError

logger = logging.getLogger(__name__)

DEVICES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True, kw_only=True)
class TimingConfig:
    """How long to warm up and how much to time (trtexec's --warmUp, --iterations, --duration)."""

    warmup_ms: float = 200.0
    iterations: int = 50
    duration_s: float = 0.0
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"--iterations {self.iterations} must be >= 1")
        if self.warmup_ms < 0 or self.duration_s < 0:
            raise ConfigError("--warmup-ms and --duration-s must not be negative")

    def flags(self) -> dict[str, Any]:
        return {"warmup_ms": self.warmup_ms, "iterations": self.iterations, "duration_s": self.duration_s,
                "threads": self.threads}


def ort_session(model_path: Path, device: str, threads: int | None) -> Any:
    """An InferenceSession on ``device`` (cpu | cuda); BackendUnavailable if its provider is absent."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ConfigError(f"unknown ONNX Runtime device {device!r}; choose one of {', '.join(DEVICES)}")
    provider = DEVICES[device]
    if provider not in ort.get_available_providers():
        raise BackendUnavailable(f"ONNX Runtime here has no {provider} (install onnxruntime-gpu on a GPU machine)")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model_path), sess_options=options, providers=[provider])


def timed_loop(step: Any, timing: TimingConfig) -> tuple[list[tuple[float, ...]], float]:
    """Warm up, then call ``step()`` (returning per-phase ms) until iterations and duration are both met."""
    warm_end = time.perf_counter() + timing.warmup_ms / 1000.0
    step()
    while time.perf_counter() < warm_end:
        step()
    samples: list[tuple[float, ...]] = []
    start = time.perf_counter()
    while len(samples) < timing.iterations or time.perf_counter() - start < timing.duration_s:
        samples.append(step())
    return samples, time.perf_counter() - start


def _cpu_step(session: Any, feeds: Mapping[str, np.ndarray]) -> Any:
    def step() -> tuple[float, ...]:
        t0 = time.perf_counter()
        session.run(None, dict(feeds))
        return ((time.perf_counter() - t0) * 1000.0,)

    return step


def _cuda_step(session: Any, feeds: Mapping[str, np.ndarray]) -> Any:
    import onnxruntime as ort

    outputs = [o.name for o in session.get_outputs()]

    def step() -> tuple[float, ...]:
        binding = session.io_binding()
        t0 = time.perf_counter()
        for name, array in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
        t1 = time.perf_counter()
        for name in outputs:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        t2 = time.perf_counter()
        binding.copy_outputs_to_cpu()
        t3 = time.perf_counter()
        return ((t1 - t0) * 1000.0, (t2 - t1) * 1000.0, (t3 - t2) * 1000.0)

    return step


def profile_onnxruntime(
    model_path: Path, feeds: Mapping[str, np.ndarray], *, label: str, device: str, timing: TimingConfig
) -> LatencyResult:
    """Latency of one ONNX model at the shape of ``feeds``."""
    import onnxruntime as ort

    session = ort_session(model_path, device, timing.threads)
    first = next(iter(feeds.values()))
    batch, seq = int(first.shape[0]), int(first.shape[1]) if first.ndim > 1 else 1
    if device == "cpu":
        samples, wall_s = timed_loop(_cpu_step(session, feeds), timing)
        compute = LatencyStats.from_samples([s[0] for s in samples])
        latency, h2d, d2h = compute, None, None
    else:
        samples, wall_s = timed_loop(_cuda_step(session, feeds), timing)
        h2d = LatencyStats.from_samples([s[0] for s in samples])
        compute = LatencyStats.from_samples([s[1] for s in samples])
        d2h = LatencyStats.from_samples([s[2] for s in samples])
        latency = LatencyStats.from_samples([sum(s) for s in samples])
    logger.info("%s on onnxruntime-%s b=%d s=%d: mean %.2f ms", label, device, batch, seq, latency.mean_ms)
    return LatencyResult(
        label=label,
        runtime=f"onnxruntime-{device}",
        runtime_version=str(ort.__version__),
        model=str(model_path),
        batch=batch,
        seq=seq,
        warmup_ms=timing.warmup_ms,
        latency=latency,
        compute=compute,
        h2d=h2d,
        d2h=d2h,
        throughput_qps=len(samples) / wall_s,
        flags={**timing.flags(), "graph_optimization_level": "ORT_ENABLE_ALL"},
    )
