"""Engine-build stage: the full TensorRT backend (10.x and 11.x), imported lazily.

- 10.x: explicit Q/DQ in strongly or weakly typed networks; weakly typed builds take the per-layer
  precision list (the fallback list) as precision constraints; the implicit-INT8 path reads our
  calibration cache through the calibrator interface (:mod:`builder.backends.calibrator`).
- 11.x: always strongly typed, explicit Q/DQ only; fallback is Cast nodes in the graph. Builder precision
  flags, calibrators and precision constraints were removed, so asking for them is a ConfigError.

Plugins are registered before parsing: a Python module registering Quickly Deployable Plugins is imported,
a shared library is loaded into the plugin registry.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from builder.backends import trt_api
from builder.backends.base import ParsedNetwork, plugin_nodes
from builder.backends.calibrator import CacheCalibrator, make_trt_calibrator
from builder.backends.options import BackendName, BuildOptions, Int8Mode, LayerDtype, Typing
from calib.artifact_io import atomic_write_bytes
from calib.errors import BackendUnavailable, BuildError, ConfigError

logger = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def load_tensorrt() -> ModuleType:
    """Import full ``tensorrt`` or explain how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailable(
            "full TensorRT is not installed: `pip install 'build-engine[tensorrt]'` on a machine with an NVIDIA "
            "GPU (see the README), or use --backend tensorrt-rtx"
        ) from exc
    module: ModuleType = tensorrt
    return module


def tensorrt_available() -> bool:
    """True when full ``tensorrt`` imports here."""
    try:
        load_tensorrt()
    except BackendUnavailable:
        return False
    return True


def major_version(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise BackendUnavailable(f"cannot read the TensorRT version {version!r}") from None


def check_options(major: int, model: onnx.ModelProto, options: BuildOptions) -> None:
    """Reject what TensorRT ``major`` cannot build (pure logic, testable without TensorRT)."""
    if major < 10:
        raise BackendUnavailable(f"TensorRT {major}.x is not supported; install TensorRT 10 or 11")
    if major >= 11:
        removed = []
        if options.typing is Typing.WEAK:
            removed.append("weak typing (--typing weak)")
        if options.int8_mode is Int8Mode.IMPLICIT:
            removed.append("implicit INT8 with a calibrator (--int8-mode implicit)")
        if options.layer_precisions:
            removed.append("per-layer precision constraints (--layer-precision)")
        if removed:
            raise ConfigError(
                f"TensorRT {major} removed {', '.join(removed)}; networks are strongly typed, INT8 comes from Q/DQ "
                "nodes and fallback from Cast nodes in the graph"
            )
    has_qdq = any(node.op_type in QDQ_OPS for node in model.graph.node)
    if options.int8_mode is Int8Mode.IMPLICIT and has_qdq:
        raise ConfigError("implicit INT8 needs a graph without Q/DQ nodes; this graph has explicit Q/DQ")
    found = plugin_nodes(model)
    if found and not options.plugins:
        raise ConfigError(
            f"the graph has {len(found)} plugin node(s), e.g. {found[0]}; register their plugins with "
            "--plugin-module (Quickly Deployable Plugins) or --plugin-library"
        )


class TensorRTBackend:
    """Builds engines with full TensorRT on the local GPU."""

    name = BackendName.TENSORRT

    def __init__(self) -> None:
        self._trt = load_tensorrt()
        self._major = major_version(self.version())
        self._timing_cache: Path | None = None
        self._has_qdq = False

    def version(self) -> str:
        return str(self._trt.__version__)

    def targets(self, options: BuildOptions) -> tuple[str, ...]:
        return ("current",)

    def check(self, model: onnx.ModelProto, options: BuildOptions) -> None:
        check_options(self._major, model, options)
        self._has_qdq = any(node.op_type in QDQ_OPS for node in model.graph.node)

    def _register_plugins(self, options: BuildOptions) -> None:
        registry = self._trt.get_plugin_registry()
        for spec in options.plugins:
            if spec.module is not None:
                try:
                    importlib.import_module(spec.module)
                except ImportError as exc:
                    raise ConfigError(f"plugin module {spec.module!r} cannot be imported: {exc}") from exc
            elif spec.library is not None:
                if not Path(spec.library).is_file():
                    raise ConfigError(f"plugin library {spec.library!r} does not exist")
                if registry.load_library(spec.library) is None:
                    raise BuildError(f"TensorRT could not load the plugin library {spec.library!r}")

    def parse(self, model_path: Path, options: BuildOptions) -> ParsedNetwork:
        self._register_plugins(options)
        strongly = options.typing is Typing.STRONG and self._major < 11  # 11 is always strongly typed
        return trt_api.parse_onnx(self._trt, model_path, strongly_typed=strongly)

    def configure(self, parsed: ParsedNetwork, options: BuildOptions) -> Any:
        trt = self._trt
        config = parsed.builder.create_builder_config()
        trt_api.apply_common(trt, config, options)
        trt_api.add_profiles(parsed, config, options.profiles)
        if options.timing_cache is not None:
            self._timing_cache = Path(options.timing_cache)
            data = self._timing_cache.read_bytes() if self._timing_cache.is_file() else b""
            config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False)
        if options.typing is Typing.WEAK:
            self._configure_weak(parsed, config, options)
        return config

    def _configure_weak(self, parsed: ParsedNetwork, config: Any, options: BuildOptions) -> None:
        trt = self._trt
        config.set_flag(trt.BuilderFlag.FP16)
        if self._has_qdq or options.int8_mode is Int8Mode.IMPLICIT:
            config.set_flag(trt.BuilderFlag.INT8)
        if options.int8_mode is Int8Mode.IMPLICIT:
            assert options.calibration_cache is not None  # BuildOptions validates this
            text = Path(options.calibration_cache).read_text(encoding="utf-8")
            core = CacheCalibrator(text, trt_version=self.version())
            names = [
                parsed.network.get_layer(i).get_output(j).name
                for i in range(parsed.network.num_layers)
                for j in range(parsed.network.get_layer(i).num_outputs)
            ]
            missing = core.missing(names)
            if missing:
                logger.warning("%d of %d tensors have no cached scale; TensorRT keeps them in higher precision "
                               "(first: %s)", len(missing), len(names), missing[:5])
            calibrator = make_trt_calibrator(trt, core)
            parsed.keepalive.append(calibrator)  # TensorRT only borrows the calibrator
            config.int8_calibrator = calibrator
        if options.layer_precisions:
            self._constrain_layers(parsed, config, options)

    def _constrain_layers(self, parsed: ParsedNetwork, config: Any, options: BuildOptions) -> None:
        trt = self._trt
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        dtypes = {LayerDtype.FP32: trt.float32, LayerDtype.FP16: trt.float16, LayerDtype.BF16: trt.bfloat16}
        layers = [parsed.network.get_layer(i) for i in range(parsed.network.num_layers)]
        for rule in options.layer_precisions:
            matched = [layer for layer in layers if fnmatch.fnmatchcase(layer.name, rule.pattern)]
            if not matched:
                raise ConfigError(f"layer precision pattern {rule.pattern!r} matches no layer of the network")
            if rule.dtype is LayerDtype.BF16:
                config.set_flag(trt.BuilderFlag.BF16)
            for layer in matched:
                layer.precision = dtypes[rule.dtype]
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, dtypes[rule.dtype])

    def build(self, parsed: ParsedNetwork, config: Any) -> Any:
        plan = trt_api.build_serialized(parsed, config)
        if self._timing_cache is not None:
            cache = config.get_timing_cache()
            atomic_write_bytes(self._timing_cache, bytes(memoryview(cache.serialize())))
            logger.info("timing cache saved to %s", self._timing_cache)
        return plan

    def serialize(self, built: Any) -> bytes:
        return trt_api.host_memory_bytes(built)
