"""Engine-build stage: the TensorRT-RTX backend (ahead-of-time builds on a CPU for chosen GPU architectures).

TensorRT-RTX networks are always strongly typed and take INT8 only as explicit Q/DQ; it has no plugins, no
calibrators, no per-layer precision constraints, and a timing cache would force a GPU query, so each of
those options is rejected up front. Only the "portable" graph variant builds here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from builder.backends import trt_api
from builder.backends.base import ParsedNetwork, plugin_nodes
from builder.backends.options import BackendName, BuildOptions, Int8Mode, Typing
from calib.errors import BackendUnavailable, ConfigError

logger = logging.getLogger(__name__)


def load_tensorrt_rtx() -> ModuleType:
    """Import ``tensorrt_rtx`` or explain how to install it."""
    try:
        import tensorrt_rtx
    except ImportError as exc:
        raise BackendUnavailable(
            "TensorRT-RTX is not installed: `pip install 'build-engine[rtx]'` (package tensorrt-rtx-cu13)"
        ) from exc
    module: ModuleType = tensorrt_rtx
    return module


def rtx_available() -> bool:
    """True when ``tensorrt_rtx`` imports here."""
    try:
        load_tensorrt_rtx()
    except BackendUnavailable:
        return False
    return True


class RtxBackend:
    """Builds portable engines with TensorRT-RTX for the listed compute capabilities."""

    name = BackendName.TENSORRT_RTX

    def __init__(self) -> None:
        self._trt = load_tensorrt_rtx()

    def version(self) -> str:
        return str(self._trt.__version__)

    def targets(self, options: BuildOptions) -> tuple[str, ...]:
        return options.architectures

    def check(self, model: onnx.ModelProto, options: BuildOptions) -> None:
        plugins = plugin_nodes(model)
        if plugins:
            raise ConfigError(
                "TensorRT-RTX has no plugins, so the 'plugin' graph variant cannot be built with it: "
                f"{len(plugins)} plugin node(s), e.g. {plugins[0]}; build the 'portable' variant instead, or "
                "use --backend tensorrt"
            )
        if options.plugins:
            raise ConfigError("TensorRT-RTX cannot load plugins; drop --plugin or use --backend tensorrt")
        if options.typing is Typing.WEAK or options.int8_mode is Int8Mode.IMPLICIT:
            raise ConfigError(
                "TensorRT-RTX builds only strongly typed networks with explicit Q/DQ; "
                "drop --typing weak / --int8-mode implicit or use --backend tensorrt"
            )
        if options.timing_cache is not None:
            raise ConfigError("TensorRT-RTX builds ahead of time without a GPU; a timing cache is not supported")
        for arch in options.architectures:
            if not hasattr(self._trt.ComputeCapability, arch.upper()):
                known = [m.lower() for m in self._trt.ComputeCapability.__members__ if m.startswith("SM")]
                raise ConfigError(f"TensorRT-RTX {self.version()} cannot target {arch}; it knows {', '.join(known)}")

    def parse(self, model_path: Path, options: BuildOptions) -> ParsedNetwork:
        return trt_api.parse_onnx(self._trt, model_path, strongly_typed=True)

    def configure(self, parsed: ParsedNetwork, options: BuildOptions) -> Any:
        trt = self._trt
        config = parsed.builder.create_builder_config()
        trt_api.apply_common(trt, config, options)
        config.num_compute_capabilities = len(options.architectures)
        for index, arch in enumerate(options.architectures):
            config.set_compute_capability(getattr(trt.ComputeCapability, arch.upper()), index)
        trt_api.add_profiles(parsed, config, options.profiles)
        return config

    def build(self, parsed: ParsedNetwork, config: Any) -> Any:
        return trt_api.build_serialized(parsed, config)

    def serialize(self, built: Any) -> bytes:
        return trt_api.host_memory_bytes(built)
