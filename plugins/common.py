"""Plugin room, shared by every fused plugin: the ONNX node convention, INT8 numerics and attribute checks.

Pipeline stage: lowering (plugin-node fusion) and engine build. Only numpy and the shared error family are
imported here, so ``calib`` and ``builder`` may use it without loading triton or tensorrt.

Node convention: our own ONNX domain, op types without a prefix, attribute ``plugin_version`` = ``"1"``,
``plugin_namespace`` = the TensorRT namespace of the node's registered I/O form (:func:`plugin_namespace`),
scales and epsilon as FLOAT attributes, flags as INT attributes (``plugins/layernorm_quant/README.md``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, fields
from typing import Any, ClassVar, Self, get_type_hints

import numpy as np
import numpy.typing as npt

from calib.errors import BackendUnavailable, GraphError, suggest

# ONNX domain of our plugin nodes in the engine graph; TensorRT's parser reads the namespace attribute.
DOMAIN = "build_engine"
PLUGIN_NAMESPACE = "build_engine"
PLUGIN_VERSION = "1"
# ONNX Runtime runs Python custom ops only in this domain (onnxruntime-extensions)
ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"

# TensorRT versions whose ``tensorrt.plugin`` has ``aot_impl`` (10.6-10.8 ship the package without it).
MIN_AOT_TENSORRT: tuple[int, int] = (10, 9)

# Widest row one program of either kernel holds in registers (elements of the normalized / softmax axis).
MAX_ROW_WIDTH = 16384

INT8_MIN = -128
INT8_MAX = 127

# ONNX TensorProto element types the kernels accept for their float inputs, with their names.
FLOAT_DTYPES: dict[int, str] = {1: "float32", 10: "float16"}


def check_positive_finite(what: str, value: float) -> float:
    """Return ``value`` as float if it is finite and > 0, else raise GraphError naming ``what``."""
    number = float(value)
    if not math.isfinite(number) or number <= 0.0:
        raise GraphError(f"{what} = {value!r} is not allowed; it must be a finite number > 0")
    return number


def check_flag(what: str, value: int) -> bool:
    """Return ``value`` as bool if it is 0 or 1, else raise GraphError naming ``what``."""
    if int(value) not in (0, 1):
        raise GraphError(f"{what} = {value!r} is not allowed; use 0 or 1")
    return bool(value)


def check_row_width(what: str, width: int) -> int:
    """Return ``width`` if 1 <= width <= MAX_ROW_WIDTH, else raise GraphError naming ``what``."""
    if not 1 <= int(width) <= MAX_ROW_WIDTH:
        raise GraphError(
            f"{what} = {width} is outside what the kernel holds in one pass; allowed 1..{MAX_ROW_WIDTH}"
        )
    return int(width)


def plugin_namespace(*features: str) -> str:
    """The TensorRT namespace of one registered plugin form: ours, suffixed with the optional I/O the form has.

    A Quickly Deployable Plugin fixes its input and output counts, and TensorRT's ONNX parser picks the creator
    by (op type, ``plugin_version``, ``plugin_namespace`` attribute); so each I/O form of an op is registered
    under its own namespace and the lowering writes that namespace on the node (op type and domain stay ours).
    """
    return "_".join((PLUGIN_NAMESPACE, *features))


def check_aot_tensorrt(version: str) -> None:
    """Raise BackendUnavailable unless TensorRT ``version`` (e.g. ``10.13.0.35``) has AOT Quickly Deployable
    Plugins (>= 10.9); an unreadable version string is refused the same way."""
    parts = version.split(".")
    try:
        found = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        raise BackendUnavailable(f"cannot read the TensorRT version {version!r}") from None
    if found < MIN_AOT_TENSORRT:
        need = ".".join(map(str, MIN_AOT_TENSORRT))
        raise BackendUnavailable(
            f"TensorRT {version} has no ahead-of-time Quickly Deployable Plugins (tensorrt.plugin.aot_impl); "
            f"the plugin engines need TensorRT >= {need}"
        )


QdpFloat = npt.NDArray[np.float32]  # a FLOAT plugin attribute, as the ONNX parser passes it (see qdp_scalar)
QdpInt = npt.NDArray[np.int32]  # an INT plugin attribute


def qdp_scalar(what: str, value: Any) -> float:
    """The one value of a plugin attribute as tensorrt.plugin hands it over (a 1-element array; see below).

    Our registrations annotate attributes as 1-D NumPy arrays, not ``float``/``int``: TensorRT's ONNX parser
    passes every scalar attribute as a 1-element field, and the 10.x creator converts it with ``float(array)``,
    which NumPy >= 2.4 refuses for arrays with ``ndim > 0`` (11.x unpacks size-1 arrays first). An array
    annotation is converted with ``astype`` by every version.
    """
    array = np.asarray(value)
    if array.size != 1:
        raise GraphError(f"plugin attribute {what} must hold one value, got {array.size}")
    return float(array.reshape(-1)[0])


def qdp_row_width(desc: Any) -> tuple[int, bool]:
    """(widest row, exact?) of a ``tensorrt.plugin.TensorDesc`` inside an ``aot_impl``: the last dimension when
    it is a build-time constant, else its optimization-profile maximum (the kernel is compiled for that and
    receives the real width as a run-time argument)."""
    last = desc.ndim - 1
    expr = desc.shape_expr[last]
    if expr.is_constant:
        return int(expr.constant_value()), True
    return int(desc.shape.max[last]), False


def check_float_dtype(what: str, elem_type: int) -> str:
    """Return the numpy name of an ONNX float element type the kernels take, else raise GraphError."""
    if elem_type in FLOAT_DTYPES:
        return FLOAT_DTYPES[elem_type]
    names = {v: k for k, v in _ONNX_TYPE_NAMES.items()}
    name = names.get(elem_type, str(elem_type))
    raise GraphError(
        f"{what} has element type {name}; the plugin takes {', '.join(FLOAT_DTYPES.values())}"
        + suggest(name, FLOAT_DTYPES.values())
    )


def check_known_keys(what: str, keys: Iterable[str], known: Iterable[str]) -> None:
    """Raise GraphError if ``keys`` holds a name outside ``known`` (typos fail, with close matches)."""
    known_list = list(known)
    for key in keys:
        if key not in known_list:
            raise GraphError(
                f"{what}: unknown attribute {key!r}; known: {', '.join(sorted(known_list))}"
                + suggest(key, known_list)
            )


def check_plugin_version(op_type: str, attrs: Mapping[str, Any]) -> None:
    """Raise GraphError unless the node's ``plugin_version`` (default: ours) is :data:`PLUGIN_VERSION`."""
    version = str(attrs.get("plugin_version", PLUGIN_VERSION))
    if version != PLUGIN_VERSION:
        raise GraphError(f"{op_type} plugin_version {version!r} is not supported; use {PLUGIN_VERSION!r}")


def attributes_from_json(op_type: str, text: str, fields: Iterable[str]) -> dict[str, Any]:
    """The attribute object of a plugin's JSON form, checked to be an object with only ``fields`` as keys."""
    data = json.loads(text)
    if not isinstance(data, dict):
        raise GraphError(f"{op_type} attributes JSON must be an object, got {type(data).__name__}")
    check_known_keys(f"{op_type} JSON", data.keys(), fields)
    return data


# ONNX attribute kind of each field type of a plugin's attributes, as the TensorRT parser maps them
# (FLOAT -> FLOAT32, INT -> INT32); flags travel as INT 0/1.
_FIELD_KINDS: dict[type, str] = {float: "FLOAT", int: "INT", bool: "INT"}
_NODE_KEYS = {"plugin_version": "STRING", "plugin_namespace": "STRING"}


class PluginAttributes:
    """Base of a plugin node's frozen attribute dataclass: its ONNX attributes and JSON form, from its fields.

    A subclass declares ``OP_TYPE``, ``SCHEMA_VERSION`` and its fields (``float``, ``int`` or ``bool``, plus
    ``version``); fields without a default are required on the node. Its ``__post_init__`` validates values and
    calls :meth:`check_version`.
    """

    OP_TYPE: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int] = 1
    version: int  # a field of the subclass (its SCHEMA_VERSION by default)

    def check_version(self) -> None:
        if self.version != self.SCHEMA_VERSION:
            raise GraphError(f"{self.OP_TYPE} schema version {self.version} is not supported; use "
                             f"{self.SCHEMA_VERSION}")

    @classmethod
    def _node_fields(cls) -> dict[str, type]:
        """Field name -> type of the fields a node carries (every field but ``version``)."""
        hints = get_type_hints(cls)
        return {f.name: hints[f.name] for f in fields(cls) if f.name != "version"}  # type: ignore[arg-type]

    @classmethod
    def attribute_kinds(cls) -> dict[str, str]:
        """Attribute name -> ONNX attribute kind of the node."""
        return {name: _FIELD_KINDS[kind] for name, kind in cls._node_fields().items()} | _NODE_KEYS

    def to_onnx_attributes(self) -> dict[str, float | int | str]:
        """Node attributes in the plugin convention (flags as INT 0/1, floats as FLOAT)."""
        out: dict[str, float | int | str] = {
            name: float(getattr(self, name)) if kind is float else int(getattr(self, name))
            for name, kind in self._node_fields().items()}
        return out | {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}

    @classmethod
    def from_onnx_attributes(cls, attrs: Mapping[str, Any]) -> Self:
        """Read and validate a node's attributes (unknown names, missing required ones and a foreign plugin version
        are errors; absent optional ones take their defaults)."""
        check_known_keys(cls.OP_TYPE, attrs.keys(), cls.attribute_kinds())
        check_plugin_version(cls.OP_TYPE, attrs)
        required = [f.name for f in fields(cls) if f.default is MISSING]  # type: ignore[arg-type]
        missing = [name for name in required if name not in attrs]
        if missing:
            raise GraphError(f"{cls.OP_TYPE} needs the attribute(s) {', '.join(missing)}")
        values: dict[str, Any] = {}
        for name, kind in cls._node_fields().items():
            if name not in attrs:
                continue
            value = attrs[name]
            values[name] = (check_flag(f"{cls.OP_TYPE} {name}", int(value)) if kind is bool
                            else float(value) if kind is float else int(value))
        return cls(**values)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls(**attributes_from_json(cls.OP_TYPE, text, [f.name for f in fields(cls)]))  # type: ignore[arg-type]


_ONNX_TYPE_NAMES: dict[str, int] = {
    "float32": 1, "uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6, "int64": 7, "string": 8,
    "bool": 9, "float16": 10, "float64": 11, "uint32": 12, "uint64": 13, "bfloat16": 16,
}


def inverse_scale(scale: float) -> float:
    """The float32 reciprocal ``RN(1 / scale)`` the kernels multiply by (one IEEE division, on the host)."""
    return float(np.float32(1.0) / np.float32(scale))


def round_half_even_to_int8(values: npt.NDArray[np.float32]) -> npt.NDArray[np.int8]:
    """Saturate to [-128, 127] and round half to even, as TensorRT's and ONNX's QuantizeLinear do.

    Clamping before rounding gives the same codes as rounding first: the bounds are integers.
    """
    clipped = np.clip(values.astype(np.float32, copy=False), np.float32(INT8_MIN), np.float32(INT8_MAX))
    return np.rint(clipped).astype(np.int8)
