"""Profiling stage: TensorRT engine latency with CUDA events (GPU only; imported lazily).

One execution context, input shapes set, device buffers bound (Polygraphy's ``polygraphy.cuda`` wrappers
of the CUDA runtime, so no pycuda is needed). Each timed iteration records four CUDA events on one stream:
``H2D copies | execute_async_v3 | D2H copies``, as trtexec splits Latency into H2D + GPU Compute + D2H.
Host buffers are pageable NumPy arrays (recorded in the flags); throughput is iterations per host second.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from builder.engine.manifest import EngineManifest
from builder.profile.ort import TimingConfig, timed_loop
from builder.profile.report import LatencyResult, LatencyStats
from calib.errors import BackendUnavailable, BuildError

logger = logging.getLogger(__name__)


def _runtime_module(manifest: EngineManifest) -> Any:
    if manifest.backend == "tensorrt-rtx":
        from builder.backends.rtx import load_tensorrt_rtx

        return load_tensorrt_rtx()
    from builder.backends.tensorrt import load_tensorrt

    return load_tensorrt()


def _cuda() -> Any:
    """Polygraphy's CUDA runtime wrapper, or BackendUnavailable when there is no usable GPU."""
    try:
        from polygraphy import cuda

        wrapper = cuda.wrapper()
        count = ctypes.c_int(0)
        status = wrapper.handle.cudaGetDeviceCount(ctypes.byref(count))
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(f"no CUDA runtime here ({exc}); TensorRT profiling needs an NVIDIA GPU") from exc
    if status != 0 or count.value < 1:
        raise BackendUnavailable("no NVIDIA GPU is visible; TensorRT profiling skipped")
    return cuda


class _Events:
    """Four CUDA events around the H2D, compute and D2H phases of one iteration."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.handles = [ctypes.c_void_p() for _ in range(4)]
        for handle in self.handles:
            self._check(lib.cudaEventCreate(ctypes.byref(handle)))

    def _check(self, status: int) -> None:
        if status != 0:
            raise BuildError(f"CUDA event call failed with status {status}")

    def record(self, index: int, stream_ptr: int) -> None:
        self._check(self._lib.cudaEventRecord(self.handles[index], ctypes.c_void_p(stream_ptr)))

    def elapsed_ms(self, start: int, end: int) -> float:
        value = ctypes.c_float()
        self._check(self._lib.cudaEventElapsedTime(ctypes.byref(value), self.handles[start], self.handles[end]))
        return float(value.value)

    def destroy(self) -> None:
        for handle in self.handles:
            self._lib.cudaEventDestroy(handle)


class _Bindings:
    """Device buffers bound to the context: (host array, device array) per input and per output."""

    def __init__(self, cuda: Any, trt: Any, engine: Any, context: Any, feeds: Mapping[str, np.ndarray],
                 manifest: EngineManifest) -> None:
        self.inputs: list[tuple[np.ndarray, Any]] = []
        self.outputs: list[tuple[np.ndarray, Any]] = []
        for name, feed in feeds.items():
            array = np.ascontiguousarray(feed, dtype=trt.nptype(engine.get_tensor_dtype(name)))
            context.set_input_shape(name, array.shape)
            device = cuda.DeviceArray(shape=array.shape, dtype=array.dtype)
            context.set_tensor_address(name, device.ptr)
            self.inputs.append((array, device))
        for spec in manifest.outputs:
            shape = tuple(context.get_tensor_shape(spec.name))
            host = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(spec.name)))
            device = cuda.DeviceArray(shape=shape, dtype=host.dtype)
            context.set_tensor_address(spec.name, device.ptr)
            self.outputs.append((host, device))

    def free(self) -> None:
        for _, device in self.inputs + self.outputs:
            device.free()


def profile_tensorrt(
    engine_dir: Path, manifest: EngineManifest, feeds: Mapping[str, np.ndarray], *, label: str, timing: TimingConfig
) -> LatencyResult:
    """Latency of the engine in ``engine_dir`` at the shape of ``feeds``."""
    trt = _runtime_module(manifest)
    cuda = _cuda()
    from builder.backends.trt_api import make_logger

    runtime = trt.Runtime(make_logger(trt))
    engine = runtime.deserialize_cuda_engine((engine_dir / manifest.plan_file).read_bytes())
    if engine is None:
        raise BuildError(f"TensorRT could not deserialize {engine_dir / manifest.plan_file}")
    context = engine.create_execution_context()
    stream = cuda.Stream()
    bindings = _Bindings(cuda, trt, engine, context, feeds, manifest)
    events = _Events(cuda.wrapper().handle)

    def step() -> tuple[float, ...]:
        events.record(0, stream.ptr)
        for host_in, dev_in in bindings.inputs:
            dev_in.copy_from(host_in, stream)
        events.record(1, stream.ptr)
        if not context.execute_async_v3(stream.ptr):
            raise BuildError("execute_async_v3 failed")
        events.record(2, stream.ptr)
        for host_out, dev_out in bindings.outputs:
            dev_out.copy_to(host_out, stream)
        events.record(3, stream.ptr)
        stream.synchronize()
        return (events.elapsed_ms(0, 1), events.elapsed_ms(1, 2), events.elapsed_ms(2, 3))

    try:
        samples, wall_s = timed_loop(step, timing)
    finally:
        events.destroy()
        bindings.free()
        stream.free()
    first = next(iter(feeds.values()))
    return LatencyResult(
        label=label,
        runtime="tensorrt" if manifest.backend == "tensorrt" else "tensorrt-rtx",
        runtime_version=str(trt.__version__),
        model=str(engine_dir / manifest.plan_file),
        batch=int(first.shape[0]),
        seq=int(first.shape[1]) if first.ndim > 1 else 1,
        warmup_ms=timing.warmup_ms,
        latency=LatencyStats.from_samples([sum(s) for s in samples]),
        compute=LatencyStats.from_samples([s[1] for s in samples]),
        h2d=LatencyStats.from_samples([s[0] for s in samples]),
        d2h=LatencyStats.from_samples([s[2] for s in samples]),
        throughput_qps=len(samples) / wall_s,
        flags={**timing.flags(), "host_memory": "pageable", "cuda_graphs": False, "transfers": True},
    )

