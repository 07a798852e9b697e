"""Test harness: NVIDIA's pure-Python ``tensorrt.plugin`` package, run without the native TensorRT library.

The package ships inside the ``tensorrt-cu12-bindings`` wheel (``tensorrt_bindings/plugin/*.py``) next to the
compiled bindings (``tensorrt.so``), which need ``libnvinfer`` and cannot load here. :func:`load_tensorrt_plugin`
extracts the package's Python files from the wheel and imports them, unmodified, as ``tensorrt.plugin`` under
a stand-in ``tensorrt`` module that provides only what the native bindings give the package: enums, plain
records (``PluginField``, ``Dims``, tensor descriptors), the base classes its plugin classes derive from, an
in-memory plugin registry, and a symbolic shape algebra in place of ``IExprBuilder`` / ``IDimensionExpr``.

So NVIDIA's own code runs here: the registration checks (``_validate.py``), the plugin creator that turns
ONNX attributes into arguments (``_lib.py``), and the AOT plugin class that calls our descriptor and
``aot_impl`` functions on symbolic shapes and collects the kernel, launch grid and extra arguments
(``_plugin_class.py``). :func:`parse_plugin_node` replays what TensorRT's ONNX parser does for a plugin node
(creator lookup by op type, ``plugin_version`` and ``plugin_namespace``; fields from same-named attributes,
FLOAT -> FLOAT32, INT -> INT32, STRING -> CHAR; the ``aot`` attribute -> creation request), following
onnx-tensorrt's ``loadFields`` and ``createPlugin``. What needs the native library -- TensorRT calling these
hooks during a real build, the driver loading the PTX, the kernel running -- waits for a GPU
(``tests/gpu/run_tensorrt_checks.sh``).

The wheels are found in ``<venv>/share/build-engine`` (``make setup`` downloads them there) or in the folder
named by ``BUILD_ENGINE_WHEEL_DIR``; tests skip with that reason when none is present.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import re
import sys
import types
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

WHEEL_GLOB = "tensorrt_cu12_bindings-*.whl"


def bindings_wheels() -> list[Path]:
    """Every ``tensorrt-cu12-bindings`` wheel found, oldest version first."""
    folders = [Path(sys.prefix) / "share" / "build-engine"]
    if os.environ.get("BUILD_ENGINE_WHEEL_DIR"):
        folders.append(Path(os.environ["BUILD_ENGINE_WHEEL_DIR"]))
    found = {w.name: w for folder in folders if folder.is_dir() for w in folder.glob(WHEEL_GLOB)}
    return sorted(found.values(), key=lambda w: wheel_version(w))


def wheel_version(wheel: Path) -> tuple[int, ...]:
    match = re.match(r"tensorrt_cu12_bindings-([\d.]+?)(?:\.post\d+)?-", wheel.name)
    assert match is not None, wheel.name
    return tuple(int(p) for p in match.group(1).split("."))


def extract_plugin_package(wheel: Path, target: Path) -> Path:
    """Extract ``tensorrt_bindings/plugin/*.py`` (Python only, no native code) into ``target``; return its folder."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("tensorrt_bindings/plugin/") and name.endswith(".py"):
                archive.extract(name, target)
    return target / "tensorrt_bindings" / "plugin"


# --- symbolic shapes: what IExprBuilder / IDimensionExpr compute inside TensorRT ----------------------------


class DimensionOperation(enum.Enum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


_OPS = {
    DimensionOperation.SUM: lambda a, b: a + b,
    DimensionOperation.PROD: lambda a, b: a * b,
    DimensionOperation.MAX: max,
    DimensionOperation.MIN: min,
    DimensionOperation.SUB: lambda a, b: a - b,
    DimensionOperation.EQUAL: lambda a, b: int(a == b),
    DimensionOperation.LESS: lambda a, b: int(a < b),
    DimensionOperation.FLOOR_DIV: lambda a, b: a // b,
    DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b),
}


class IDimensionExpr:
    """A dimension expression: a constant, a named dynamic dimension, or an operation of two expressions."""

    def __init__(self, value: int | None = None, symbol: str | None = None,
                 op: DimensionOperation | None = None, args: tuple[IDimensionExpr, ...] = ()) -> None:
        self.value, self.symbol, self.op, self.args = value, symbol, op, args

    def is_constant(self) -> bool:
        return self.value is not None

    def get_constant_value(self) -> int:
        assert self.value is not None, "not a constant"
        return self.value

    def evaluate(self, env: Mapping[str, int]) -> int:
        if self.value is not None:
            return self.value
        if self.symbol is not None:
            return env[self.symbol]
        assert self.op is not None
        return int(_OPS[self.op](self.args[0].evaluate(env), self.args[1].evaluate(env)))


class IExprBuilder:
    def constant(self, value: int) -> IDimensionExpr:
        return IDimensionExpr(value=int(value))

    def operation(self, op: DimensionOperation, a: IDimensionExpr, b: IDimensionExpr) -> IDimensionExpr:
        if a.is_constant() and b.is_constant():  # TensorRT folds constant operands too
            return IDimensionExpr(value=int(_OPS[op](a.get_constant_value(), b.get_constant_value())))
        return IDimensionExpr(op=op, args=(a, b))


def dim(value: int | str) -> IDimensionExpr:
    """A constant dimension, or a dynamic one named ``value``."""
    return IDimensionExpr(value=value) if isinstance(value, int) else IDimensionExpr(symbol=value)


def evaluate(expr: Any, env: Mapping[str, int]) -> int:
    """Value of an IDimensionExpr, of a ShapeExpr/SymInt32 wrapping one, or of the ISymExpr a launch hook set."""
    inner = getattr(expr, "expr", None) or getattr(expr, "_expr", None) or expr
    assert isinstance(inner, IDimensionExpr), type(expr)
    return inner.evaluate(env)


# --- the rest of the native surface the package touches -------------------------------------------------------


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10
    E8M0 = 11


class PluginFieldType(enum.Enum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


TensorFormat = enum.Enum("TensorFormat", "LINEAR CHW2 HWC8 CHW4 CHW16 CHW32 DHWC8 CDHW32 HWC DLA_LINEAR DLA_HWC4 "
                                         "HWC16 DHWC")
QuickPluginCreationRequest = enum.Enum("QuickPluginCreationRequest", "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT "
                                                                     "STRICT_AOT")
TensorRTPhase = enum.Enum("TensorRTPhase", "BUILD RUNTIME")
PluginArgType = enum.Enum("PluginArgType", "INT")
PluginArgDataType = enum.Enum("PluginArgDataType", "INT8 INT16 INT32")


class Dims(list[int]):
    MAX_DIMS = 8

    def __init__(self, shape: Sequence[int] | int = ()) -> None:
        super().__init__([0] * shape if isinstance(shape, int) else list(shape))


class DimsExprs(list[Any]):
    def __init__(self, length: int) -> None:
        super().__init__([None] * length)


@dataclass
class PluginField:
    name: str
    data: Any = None
    type: PluginFieldType = PluginFieldType.UNKNOWN


class PluginFieldCollection(list[PluginField]):
    pass


@dataclass
class PluginTensorDesc:
    type: Any = None
    format: Any = None
    dims: Dims = field(default_factory=Dims)
    scale: float = -1.0


@dataclass
class DynamicPluginTensorDesc:
    desc: PluginTensorDesc
    min: Dims
    opt: Dims
    max: Dims


class _Base:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs


class Logger(_Base):
    WARNING = "WARNING"

    def log(self, severity: Any, msg: str) -> None:
        del severity, msg


class PluginRegistry:
    """The plugin registry: creators keyed by (name, version, namespace)."""

    def __init__(self) -> None:
        self.creators: dict[tuple[str, str, str], Any] = {}

    def register_creator(self, creator: Any, namespace: str) -> bool:
        key = (creator.name, creator.plugin_version, namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name: str, version: str, namespace: str = "") -> Any:
        return self.creators.get((name, version, namespace))


def _make_tensorrt_module(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    registry = PluginRegistry()
    names: dict[str, Any] = {
        "__version__": version, "DataType": DataType, "PluginFieldType": PluginFieldType,
        "TensorFormat": TensorFormat, "QuickPluginCreationRequest": QuickPluginCreationRequest,
        "TensorRTPhase": TensorRTPhase, "PluginArgType": PluginArgType, "PluginArgDataType": PluginArgDataType,
        "DimensionOperation": DimensionOperation, "IDimensionExpr": IDimensionExpr, "IExprBuilder": IExprBuilder,
        "Dims": Dims, "DimsExprs": DimsExprs, "PluginField": PluginField,
        "PluginFieldCollection": PluginFieldCollection, "PluginTensorDesc": PluginTensorDesc,
        "DynamicPluginTensorDesc": DynamicPluginTensorDesc, "Logger": Logger,
        "get_plugin_registry": lambda: registry,
        "float32": DataType.FLOAT, "float16": DataType.HALF, "bfloat16": DataType.BF16, "int8": DataType.INT8,
        "int32": DataType.INT32, "int64": DataType.INT64, "bool": DataType.BOOL, "uint8": DataType.UINT8,
        "fp8": DataType.FP8, "int4": DataType.INT4, "fp4": DataType.FP4,
    }
    for base in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                 "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick", "ISymExpr", "ITensor"):
        names[base] = type(base, (_Base,), {})
    for key, value in names.items():
        setattr(trt, key, value)
    return trt


@dataclass
class PluginPackage:
    """The loaded ``tensorrt`` stand-in and NVIDIA's ``tensorrt.plugin`` package of one wheel."""

    version: str
    trt: types.ModuleType
    trtp: types.ModuleType

    @property
    def registry(self) -> PluginRegistry:
        registry: PluginRegistry = self.trt.get_plugin_registry()
        return registry

    def module(self, name: str) -> types.ModuleType:
        return sys.modules[f"tensorrt.plugin.{name}"]


@contextmanager
def load_tensorrt_plugin(wheel: Path, workdir: Path) -> Iterator[PluginPackage]:
    """Import the wheel's ``tensorrt.plugin`` (unmodified) under the stand-in ``tensorrt``; undo it on exit.

    Our plugin modules are re-imported inside, so every load starts from an empty registry, and nothing of it
    leaks into other tests (``import tensorrt`` fails again afterwards).
    """
    version = ".".join(map(str, wheel_version(wheel)))
    folder = extract_plugin_package(wheel, workdir / version)
    ours = ("tensorrt", "plugins.layernorm_quant.plugin", "plugins.softmax_quant.plugin")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "tensorrt" or k in ours}
    for key in saved:
        del sys.modules[key]
    trt = _make_tensorrt_module(version)
    sys.modules["tensorrt"] = trt
    try:
        spec = importlib.util.spec_from_file_location("tensorrt.plugin", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        assert spec is not None and spec.loader is not None
        trtp = importlib.util.module_from_spec(spec)
        sys.modules["tensorrt.plugin"] = trtp
        trt.plugin = trtp  # type: ignore[attr-defined]
        with warnings.catch_warnings():  # NVIDIA's docstrings hold "\s" escapes (DeprecationWarning on compile)
            warnings.simplefilter("ignore", DeprecationWarning)
            spec.loader.exec_module(trtp)
        yield PluginPackage(version=version, trt=trt, trtp=trtp)
    finally:
        for key in [k for k in sys.modules if k.split(".")[0] == "tensorrt" or k in ours]:
            del sys.modules[key]
        sys.modules.update(saved)


# --- the ONNX parser's part -------------------------------------------------------------------------------


def _fields(node: onnx.NodeProto, field_names: Sequence[PluginField]) -> PluginFieldCollection:
    """onnx-tensorrt ``loadFields``: one field per creator field with a same-named attribute, typed by the
    attribute (FLOAT -> FLOAT32, INT -> INT32, STRING -> CHAR); creator fields without one are skipped."""
    attrs = {a.name: a for a in node.attribute}
    fields = PluginFieldCollection()
    for wanted in field_names:
        attr = attrs.get(wanted.name)
        if attr is None:
            continue
        if attr.type == onnx.AttributeProto.FLOAT:
            fields.append(PluginField(attr.name, np.array([attr.f], np.float32), PluginFieldType.FLOAT32))
        elif attr.type == onnx.AttributeProto.INT:
            fields.append(PluginField(attr.name, np.array([attr.i], np.int32), PluginFieldType.INT32))
        elif attr.type == onnx.AttributeProto.STRING:
            fields.append(PluginField(attr.name, np.frombuffer(attr.s, np.int8), PluginFieldType.CHAR))
        else:
            raise AssertionError(f"attribute type {attr.type} not replayed")
    return fields


def creation_request(node: onnx.NodeProto) -> QuickPluginCreationRequest:
    """onnx-tensorrt ``createPlugin``: a node attribute ``aot`` makes the request strict; without it (and without
    the network's PREFER_* flags) the request is UNKNOWN and the creator picks the implementation defined."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if "aot" not in attrs:
        return QuickPluginCreationRequest.UNKNOWN
    return QuickPluginCreationRequest.STRICT_AOT if attrs["aot"] else QuickPluginCreationRequest.STRICT_JIT


def parse_plugin_node(package: PluginPackage, node: onnx.NodeProto) -> Any:
    """The plugin object TensorRT's ONNX parser would create for ``node`` (AssertionError: no creator)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    version = attrs.get("plugin_version", b"1").decode()
    namespace = attrs.get("plugin_namespace", b"").decode() or node.domain
    creator = package.registry.get_creator(node.op_type, version, namespace)
    assert creator is not None, f"no creator for {namespace}::{node.op_type} v{version}"
    fields = _fields(node, creator.field_names)
    return creator.create_plugin(node.op_type, namespace, fields, TensorRTPhase.BUILD, creation_request(node))


@dataclass
class Launch:
    """What an AOT plugin handed TensorRT for one I/O configuration."""

    kernel_name: str
    ptx: str
    grid: tuple[Any, Any, Any]
    block: tuple[Any, Any, Any]
    shared_mem: Any
    extra: list[Any]


class _LaunchParams:
    grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = None


class _SymExprSetter(dict[int, Any]):
    nbSymExprs = 0  # the binding's attribute name


def output_shapes(plugin: Any, input_shapes: Sequence[Sequence[int | str]],
                  input_types: Sequence[DataType]) -> tuple[list[DataType], list[list[IDimensionExpr]]]:
    """Output dtypes and symbolic output shapes, through the plugin's own TensorRT hooks (build phase)."""
    out_types = plugin.get_output_data_types(list(input_types), [len(s) for s in input_shapes])
    exprs = [[dim(d) for d in shape] for shape in input_shapes]
    out_exprs = plugin.get_output_shapes(exprs, [], IExprBuilder())
    return list(out_types), [list(e) for e in out_exprs]


def launch(plugin: Any, inputs: Sequence[tuple[Sequence[int | str], DataType]],
           outputs: Sequence[tuple[Sequence[int | str], DataType]],
           profile: Mapping[str, tuple[int, int, int]]) -> Launch:
    """Call the AOT plugin's ``get_launch_params`` / ``get_kernel`` as TensorRT does after shape inference.

    Shapes name dynamic dims by string; ``profile`` gives each name's (min, opt, max).
    """
    def desc(shape: Sequence[int | str], dtype: DataType) -> DynamicPluginTensorDesc:
        dims = Dims([d if isinstance(d, int) else -1 for d in shape])
        pick = [[d if isinstance(d, int) else profile[d][k] for d in shape] for k in range(3)]
        return DynamicPluginTensorDesc(desc=PluginTensorDesc(type=dtype, format=TensorFormat.LINEAR, dims=dims),
                                       min=Dims(pick[0]), opt=Dims(pick[1]), max=Dims(pick[2]))

    in_out = [desc(s, t) for s, t in inputs] + [desc(s, t) for s, t in outputs]
    params, setter = _LaunchParams(), _SymExprSetter()
    plugin.set_tactic(0)
    plugin.get_launch_params([[dim(d) for d in s] for s, _ in inputs], in_out, len(inputs), params, setter,
                             IExprBuilder())
    name, ptx = plugin.get_kernel([d.desc for d in in_out[: len(inputs)]], [d.desc for d in in_out[len(inputs):]])
    return Launch(kernel_name=name.decode() if isinstance(name, bytes) else name,
                  ptx=ptx.decode() if isinstance(ptx, bytes) else ptx,
                  grid=(params.grid_x, params.grid_y, params.grid_z),
                  block=(params.block_x, params.block_y, params.block_z), shared_mem=params.shared_mem,
                  extra=[setter[i] for i in range(setter.nbSymExprs)])
