"""Engine-build stage: helpers shared by the TensorRT and TensorRT-RTX backends.

Both libraries expose the same Python API shape (Builder, OnnxParser, IBuilderConfig, optimization
profiles), so one set of helpers takes the imported module as an argument. The module itself is always
imported lazily by the backend that calls these helpers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from builder.backends import dims
from builder.backends.base import ParsedNetwork, TensorSpec
from builder.backends.options import BuildOptions, ShapeProfile
from calib.errors import BackendUnavailable, BuildError

logger = logging.getLogger(__name__)

# TensorRT DataType member name -> numpy-style dtype name used in manifests
DTYPE_NAMES: dict[str, str] = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
    "FP8": "float8e4m3",
    "INT4": "int4",
    "FP4": "float4e2m1",
    "E8M0": "float8e8m0",
}


def make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to :mod:`logging` and keeps the error lines for error messages."""

    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # the base __init__ must be called explicitly (pybind11 trampoline)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity))
            if name in ("INTERNAL_ERROR", "ERROR"):
                self.errors.append(msg)
                logger.error("%s", msg)
            elif name == "WARNING":
                logger.warning("%s", msg)
            elif name == "INFO":
                logger.info("%s", msg)
            else:
                logger.debug("%s", msg)

    return _Logger()


def dtype_name(trt_dtype: Any) -> str:
    """Numpy-style name of a TensorRT DataType."""
    name = str(getattr(trt_dtype, "name", trt_dtype))
    return DTYPE_NAMES.get(name, name.lower())


def _io_specs(network: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    inputs = tuple(
        TensorSpec(name=t.name, dtype=dtype_name(t.dtype), shape=tuple(int(d) for d in t.shape))
        for t in (network.get_input(i) for i in range(network.num_inputs))
    )
    outputs = tuple(
        TensorSpec(name=t.name, dtype=dtype_name(t.dtype), shape=tuple(int(d) for d in t.shape))
        for t in (network.get_output(i) for i in range(network.num_outputs))
    )
    return inputs, outputs


def make_builder(trt: Any, trt_logger: Any) -> Any:
    """A ``trt.Builder``; BackendUnavailable when the library cannot create one (no usable GPU or driver:
    pybind raises "factory function returned nullptr" after TensorRT logs the CUDA error)."""
    try:
        builder = trt.Builder(trt_logger)
    except (TypeError, RuntimeError) as exc:
        why = "; ".join(getattr(trt_logger, "errors", [])) or str(exc)
        raise BackendUnavailable(f"{trt.__name__} {trt.__version__} cannot create a builder here: {why}") from exc
    if builder is None:
        raise BackendUnavailable(f"{trt.__name__} {trt.__version__} cannot create a builder here (no usable GPU?)")
    return builder


def parse_onnx(
    trt: Any, model_path: Path, *, strongly_typed: bool, plugin_override: bool = False,
    builder: Any = None, trt_logger: Any = None,
) -> ParsedNetwork:
    """Parse ``model_path`` (external data resolved next to it) into a network; parser errors -> BuildError."""
    trt_logger = trt_logger if trt_logger is not None else make_logger(trt)
    builder = builder if builder is not None else make_builder(trt, trt_logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    if plugin_override and hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(str(model_path)):
        details = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            where = f"node {err.node_name()!r} ({err.node_operator()})" if err.node() >= 0 else "model"
            details.append(f"{where}: {err.desc()}")
        raise BuildError(f"the ONNX parser rejected {model_path}:\n  " + "\n  ".join(details or trt_logger.errors))
    inputs, outputs = _io_specs(network)
    return ParsedNetwork(
        builder=builder, network=network, parser=parser, logger=trt_logger, inputs=inputs, outputs=outputs
    )


def profile_shapes(
    spec: TensorSpec, profile: ShapeProfile, roles: dims.Roles | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """min/opt/max shapes of one input (see :func:`builder.backends.dims.profile_shapes`)."""
    return dims.profile_shapes(spec.name, spec.shape, profile, roles)


def add_profiles(parsed: ParsedNetwork, config: Any, profiles: Sequence[ShapeProfile]) -> None:
    """Add one optimization profile per :class:`ShapeProfile` (only when some input is dynamic)."""
    if not any(-1 in spec.shape for spec in parsed.inputs):
        return
    for profile in profiles:
        trt_profile = parsed.builder.create_optimization_profile()
        for spec in parsed.inputs:
            mn, opt, mx = profile_shapes(spec, profile, parsed.dim_roles or None)
            trt_profile.set_shape(spec.name, mn, opt, mx)
        if config.add_optimization_profile(trt_profile) < 0:
            raise BuildError(f"TensorRT rejected the optimization profile {profile.to_dict()}")


def apply_common(trt: Any, config: Any, options: BuildOptions) -> None:
    """Workspace limit and builder optimization level (both libraries support them)."""
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    config.builder_optimization_level = options.optimization_level


def build_serialized(parsed: ParsedNetwork, config: Any) -> Any:
    """Build and serialize; a failed build raises BuildError with the builder's own error lines."""
    plan = parsed.builder.build_serialized_network(parsed.network, config)
    if plan is None:
        errors = "\n  ".join(parsed.logger.errors) or "(no error message from the builder)"
        raise BuildError(f"the engine build failed:\n  {errors}")
    return plan


def host_memory_bytes(plan: Any) -> bytes:
    """Copy a ``trt.IHostMemory`` into Python bytes."""
    return bytes(memoryview(plan))
