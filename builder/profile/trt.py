"""Profiling stage: TensorRT engine latency with CUDA events (GPU only; imported lazily).

One execution context, input shapes set, device buffers bound (Polygraphy's ``polygraphy.cuda`` wrappers
of the CUDA runtime; >= 0.53.4 also finds the runtime that ``pip install nvidia-cuda-runtime-cu12`` puts in
site-packages, older ones only a system CUDA). Each timed iteration records four CUDA events on one stream:
``H2D copies | execute_async_v3 | D2H copies``, as trtexec splits Latency into H2D + GPU Compute + D2H.
Host buffers are pageable NumPy arrays (recorded in the flags); throughput is iterations per host second.

The engine's own I/O tensors are bound (TensorRT may drop an ONNX input the graph never reads), with host
storage for every TensorRT type (:mod:`builder.profile.trt_io`: BF16, FP8, INT4 included); every call that
reports success with a bool is checked. Plugin libraries the manifest records are loaded before the plan is
deserialized (ahead-of-time Python plugins are inside the plan). No GPU: BackendUnavailable (the sweep skips
with that reason); a GPU the driver sees but no loadable CUDA runtime: ConfigError, never a silent skip.
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
from builder.profile.trt_io import host_buffer
from calib.errors import BackendUnavailable, BuildError, ConfigError

MIN_POLYGRAPHY = (0, 53, 4)  # the first release that finds a pip-installed CUDA runtime

logger = logging.getLogger(__name__)


def _runtime_module(manifest: EngineManifest) -> Any:
    if manifest.backend == "tensorrt-rtx":
        from builder.backends.rtx import load_tensorrt_rtx

        return load_tensorrt_rtx()
    from builder.backends.tensorrt import load_tensorrt

    return load_tensorrt()


def _driver_sees_gpu() -> bool:
    """True when the NVIDIA driver (libcuda) is present and reports at least one device."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def _polygraphy_version() -> str:
    try:
        import polygraphy
    except ImportError:
        return "none"
    return str(polygraphy.__version__)


def _cuda() -> Any:
    """Polygraphy's CUDA runtime wrapper; BackendUnavailable without a GPU, ConfigError when a GPU is visible
    but no CUDA runtime can be loaded (what Polygraphy < 0.53.4 does with a pip-installed runtime)."""
    if not _driver_sees_gpu():
        raise BackendUnavailable("no NVIDIA GPU is visible (no driver or no device); TensorRT profiling skipped")
    try:
        from polygraphy import cuda

        wrapper = cuda.wrapper()
        count = ctypes.c_int(0)
        status = wrapper.handle.cudaGetDeviceCount(ctypes.byref(count))
    except (ImportError, OSError, RuntimeError) as exc:
        need = ".".join(map(str, MIN_POLYGRAPHY))
        raise ConfigError(
            f"a GPU is visible but the CUDA runtime cannot be loaded ({exc}); install "
            f"'build-engine[tensorrt,gpu]' (polygraphy >= {need}, found {_polygraphy_version()}; "
            "nvidia-cuda-runtime-cu12)"
        ) from exc
    if status != 0 or count.value < 1:
        raise BackendUnavailable(f"the CUDA runtime sees no device (status {status}); TensorRT profiling skipped")
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


def _check(ok: Any, what: str) -> None:
    if not ok:
        raise BuildError(f"TensorRT refused {what}")


class _Bindings:
    """Device buffers bound to the context for every I/O tensor of the engine: (host, device) pairs."""

    def __init__(self, cuda: Any, trt: Any, engine: Any, context: Any, feeds: Mapping[str, np.ndarray]) -> None:
        self.inputs: list[tuple[np.ndarray, Any]] = []
        self.outputs: list[tuple[np.ndarray, Any]] = []
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        missing = [n for n in inputs if n not in feeds]
        if missing:
            raise ConfigError(f"the engine takes inputs {missing} that the profile feeds do not provide")
        unused = sorted(set(feeds) - set(inputs))
        if unused:
            logger.info("the engine does not take %s (TensorRT dropped unused graph inputs)", unused)
        for name in inputs:
            kind = engine.get_tensor_dtype(name).name
            host = host_buffer(kind, feeds[name].shape, feeds[name])
            _check(context.set_input_shape(name, tuple(feeds[name].shape)), f"input shape {feeds[name].shape} "
                   f"for {name!r} (outside the engine's profile?)")
            self.inputs.append((host, self._bind(cuda, context, name, host)))
        unresolved = context.infer_shapes()
        if unresolved:
            raise BuildError(f"TensorRT cannot infer the shapes of {list(unresolved)} from the inputs given")
        for name in (n for n in names if n not in inputs):
            host = host_buffer(engine.get_tensor_dtype(name).name, tuple(context.get_tensor_shape(name)))
            self.outputs.append((host, self._bind(cuda, context, name, host)))

    @staticmethod
    def _bind(cuda: Any, context: Any, name: str, host: np.ndarray) -> Any:
        device = cuda.DeviceArray(shape=host.shape, dtype=host.dtype)
        _check(context.set_tensor_address(name, device.ptr), f"the device address of {name!r}")
        return device

    def free(self) -> None:
        for _, device in self.inputs + self.outputs:
            device.free()


def _load_plugins(trt: Any, manifest: EngineManifest, engine_dir: Path) -> None:
    """Load the plugin libraries the engine was built with (from the manifest) before deserializing it."""
    from builder.backends.tensorrt import load_plugin_library

    for plugin in manifest.plugins:
        if plugin.source is not None and plugin.source.endswith(".so"):
            path = Path(plugin.source)
            load_plugin_library(trt, str(path if path.is_file() else engine_dir / path.name))


def profile_tensorrt(
    engine_dir: Path, manifest: EngineManifest, feeds: Mapping[str, np.ndarray], *, label: str, timing: TimingConfig
) -> LatencyResult:
    """Latency of the engine in ``engine_dir`` at the shape of ``feeds``."""
    trt = _runtime_module(manifest)
    cuda = _cuda()
    from builder.backends.trt_api import make_logger

    if manifest.backend == "tensorrt":
        _load_plugins(trt, manifest, engine_dir)
    trt_logger = make_logger(trt)
    runtime = trt.Runtime(trt_logger)
    engine = runtime.deserialize_cuda_engine((engine_dir / manifest.plan_file).read_bytes())
    if engine is None:
        raise BuildError(f"TensorRT could not deserialize {engine_dir / manifest.plan_file}: "
                         + ("; ".join(trt_logger.errors) or "no message"))
    context = engine.create_execution_context()
    if context is None:
        raise BuildError(f"TensorRT could not create an execution context for {engine_dir / manifest.plan_file}")
    stream = cuda.Stream()
    bindings = _Bindings(cuda, trt, engine, context, feeds)
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

