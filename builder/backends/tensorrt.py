"""Engine-build stage: the full TensorRT backend (10.x and 11.x), imported lazily.

- 10.x: explicit Q/DQ in strongly or weakly typed networks; weakly typed builds take the per-layer
  precision list (the fallback list) as precision constraints; the implicit-INT8 path reads our
  calibration cache through the calibrator interface (:mod:`builder.backends.calibrator`).
- 11.x: always strongly typed, explicit Q/DQ only; fallback is Cast nodes in the graph. Builder precision
  flags, calibrators and precision constraints were removed, so asking for them is a ConfigError.

Plugins are registered before parsing: a Python module of Quickly Deployable Plugins is imported and its
``register()`` called (our ``plugins/*/plugin.py``; TensorRT >= 10.9), a shared library is loaded into the
plugin registry once per process (a second ``load_library`` of an already registered library returns None;
libraries without the ``getCreators`` entry points register their creators when loaded with
``ctypes.CDLL(RTLD_GLOBAL)``, the fallback). Then every creator the graph's plugin nodes need must be in the
registry (:mod:`builder.backends.plugin_check`), still before parsing. A foreign timing cache (another GPU
or TensorRT version) is reported and replaced, never fatal; a builder that cannot be created (no usable GPU)
is BackendUnavailable, so ``--backend auto`` falls back to TensorRT-RTX.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from builder.backends import trt_api
from builder.backends.base import ParsedNetwork, plugin_nodes
from builder.backends.calibrator import CacheCalibrator, make_trt_calibrator
from builder.backends.options import BackendName, BuildOptions, Int8Mode, LayerDtype, PluginSpec, Typing
from builder.backends.plugin_check import PluginNeed, check_plugin_nodes, check_registered
from builder.backends.precision import constrained_layers, layer_views
from calib.artifact_io import atomic_write_bytes
from calib.errors import BackendUnavailable, BuildError, ConfigError
from plugins.common import check_aot_tensorrt

logger = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# plugin libraries loaded in this process (resolved path -> handle): TensorRT keeps their creators registered
_LOADED_LIBRARIES: dict[str, Any] = {}


def load_tensorrt() -> ModuleType:
    """Import full ``tensorrt`` or explain how to get it (a wheel whose native libraries fail to load too)."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:
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


def load_plugin_library(trt: Any, path: str) -> None:
    """Load a plugin library into TensorRT's registry once per process (see the module docstring)."""
    lib = Path(path)
    if not lib.is_file():
        raise ConfigError(f"plugin library {path!r} does not exist")
    key = str(lib.resolve())
    if key in _LOADED_LIBRARIES:
        logger.debug("plugin library %s already loaded", key)
        return
    handle = trt.get_plugin_registry().load_library(key)
    if handle is None:
        logger.info("TensorRT's load_library returned None for %s; loading it with ctypes (RTLD_GLOBAL)", key)
        try:
            handle = ctypes.CDLL(key, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise BuildError(f"the plugin library {path!r} cannot be loaded: {exc}") from exc
    _LOADED_LIBRARIES[key] = handle


def register_plugin_module(name: str) -> None:
    """Import a Quickly Deployable Plugin module and call its ``register()`` (import alone registers nothing)."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"plugin module {name!r} cannot be imported: {exc}") from exc
    register = getattr(module, "register", None)
    if callable(register):
        register()
    else:
        logger.info("plugin module %s has no register(); relying on what its import registered", name)


class TensorRTBackend:
    """Builds engines with full TensorRT on the local GPU."""

    name = BackendName.TENSORRT

    def __init__(self) -> None:
        self._trt = load_tensorrt()
        self._major = major_version(self.version())
        self._logger = trt_api.make_logger(self._trt)
        self._builder = trt_api.make_builder(self._trt, self._logger)  # no usable GPU: BackendUnavailable
        self._timing_cache: Path | None = None
        self._has_qdq = False
        self._needs: tuple[PluginNeed, ...] = ()

    def version(self) -> str:
        return str(self._trt.__version__)

    def targets(self, options: BuildOptions) -> tuple[str, ...]:
        return ("current",)

    def check(self, model: onnx.ModelProto, options: BuildOptions) -> None:
        check_options(self._major, model, options)
        self._has_qdq = any(node.op_type in QDQ_OPS for node in model.graph.node)
        self._needs = check_plugin_nodes(model)
        if any(spec.module is not None for spec in options.plugins):
            check_aot_tensorrt(self.version())

    def _register_plugins(self, plugins: tuple[PluginSpec, ...]) -> None:
        for spec in plugins:
            if spec.module is not None:
                register_plugin_module(spec.module)
            elif spec.library is not None:
                load_plugin_library(self._trt, spec.library)
        registry = self._trt.get_plugin_registry()
        check_registered(self._needs, registry.get_creator)

    def parse(self, model_path: Path, options: BuildOptions) -> ParsedNetwork:
        self._register_plugins(options.plugins)
        strongly = options.typing is Typing.STRONG and self._major < 11  # 11 is always strongly typed
        return trt_api.parse_onnx(self._trt, model_path, strongly_typed=strongly, builder=self._builder,
                                  trt_logger=self._logger)

    def configure(self, parsed: ParsedNetwork, options: BuildOptions) -> Any:
        trt = self._trt
        config = parsed.builder.create_builder_config()
        trt_api.apply_common(trt, config, options)
        trt_api.add_profiles(parsed, config, options.profiles)
        if options.timing_cache is not None:
            self._timing_cache = Path(options.timing_cache)
            self._use_timing_cache(config, self._timing_cache)
        if options.typing is Typing.WEAK:
            self._configure_weak(parsed, config, options)
        return config

    def _use_timing_cache(self, config: Any, path: Path) -> None:
        """Read the cache file into the config; a foreign or unreadable one is replaced by a fresh cache."""
        data = path.read_bytes() if path.is_file() else b""
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        logger.warning("timing cache %s was made on another GPU or TensorRT version (or is damaged); starting a "
                       "fresh one, which replaces it after the build", path)
        if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
            logger.warning("TensorRT refused an empty timing cache; building without one")
            self._timing_cache = None

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
        if any(rule.dtype is LayerDtype.BF16 for rule in options.layer_precisions):
            config.set_flag(trt.BuilderFlag.BF16)
        for constraint in constrained_layers(layer_views(parsed.network), options.layer_precisions):
            layer = parsed.network.get_layer(constraint.index)
            layer.precision = dtypes[constraint.dtype]
            for j in constraint.outputs:
                layer.set_output_type(j, dtypes[constraint.dtype])

    def build(self, parsed: ParsedNetwork, config: Any) -> Any:
        plan = trt_api.build_serialized(parsed, config)
        if self._timing_cache is not None:
            self._save_timing_cache(config, self._timing_cache)
        return plan

    def _save_timing_cache(self, config: Any, path: Path) -> None:
        """Write the updated cache; a missing cache or a failed write is a warning, never a lost engine."""
        cache = config.get_timing_cache()
        if cache is None:
            logger.warning("TensorRT returned no timing cache after the build; %s left as it was", path)
            return
        try:
            atomic_write_bytes(path, bytes(memoryview(cache.serialize())))
        except OSError as exc:
            logger.warning("could not save the timing cache to %s: %s", path, exc)
            return
        logger.info("timing cache saved to %s", path)

    def serialize(self, built: Any) -> bytes:
        return trt_api.host_memory_bytes(built)
