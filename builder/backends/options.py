"""Engine-build stage: typed build options shared by every backend (profiles, limits, targets, plugins).

Options are frozen msgspec Schemas (calib.schema) validated on construction and on decoding, so a bad flag
or a misspelled key fails before any expensive work. They round-trip through JSON (they are recorded in
every engine manifest and hashed for stage reuse); decoding rejects unknown keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any, TypeVar

import msgspec

from calib.errors import ConfigError, suggest
from calib.schema import Schema, convert, to_builtins

BUILD_OPTIONS_VERSION = 1


class BackendName(StrEnum):
    """Which engine builder to use (``auto`` prefers full TensorRT, then TensorRT-RTX)."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"

    @classmethod
    def parse(cls, text: str) -> BackendName:
        try:
            return cls(text)
        except ValueError:
            known = [m.value for m in cls]
            raise ConfigError(
                f"unknown backend {text!r}; choose one of {', '.join(known)}{suggest(text, known)}"
            ) from None


class Typing(StrEnum):
    """Network typing: strong (precision from the graph) or weak (TensorRT 10 builder flags)."""

    STRONG = "strong"
    WEAK = "weak"


class Int8Mode(StrEnum):
    """How INT8 reaches the engine: Q/DQ nodes in the graph, or TensorRT 10's implicit path fed by a cache."""

    EXPLICIT = "explicit"
    IMPLICIT = "implicit"


class LayerDtype(StrEnum):
    """Precisions a weakly typed TensorRT 10 layer can be pinned to (the fallback list)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


# TensorRT-RTX ahead-of-time targets (TensorRT-RTX docs, AOT compilation); the default is NVIDIA's AOT set.
RTX_ARCHITECTURES: tuple[str, ...] = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
DEFAULT_RTX_ARCHITECTURES: tuple[str, ...] = ("sm80", "sm86", "sm89", "sm120")


class DimRange(Schema, frozen=True, kw_only=True, array_like=True):
    """min/opt/max of one dynamic dimension in an optimization profile (0 allowed: an empty KV cache).

    In JSON it is the array ``[min, opt, max]``.
    """

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if self.min < 0:
            raise ConfigError(f"profile dimension min={self.min} must be >= 0")
        if not self.min <= self.opt <= self.max:
            raise ConfigError(
                f"profile dimension needs min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}"
            )

    @classmethod
    def parse(cls, text: str, what: str, *, minimum: int = 1) -> DimRange:
        """Parse ``"1,8,32"`` (min,opt,max) or a single fixed value ``"8"``; min must be >= ``minimum``."""
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"{what} {text!r} is not 'min,opt,max' of integers (for example 1,8,32)") from None
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ConfigError(f"{what} {text!r} needs one value or three (min,opt,max)")
        if values[0] < minimum:
            raise ConfigError(f"{what} {text!r}: min={values[0]} must be >= {minimum}")
        return cls(min=values[0], opt=values[1], max=values[2])

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


class ShapeProfile(Schema, frozen=True, kw_only=True, omit_defaults=True):
    """One optimization profile: ranges of the named dynamic dimensions every input shape is made of.

    ``batch`` and ``seq`` (new tokens); ``past`` is the KV-cache length of a decoder graph (``past_key_values``
    inputs), and an attention mask spanning cache and new tokens gets ``past + seq``
    (:mod:`builder.backends.dims` assigns each input axis its dimension). JSON leaves ``past`` out when unset.
    """

    batch: DimRange
    seq: DimRange
    past: DimRange | None = None

    def __post_init__(self) -> None:
        for name, rng in (("batch", self.batch), ("sequence", self.seq)):
            if rng.min < 1:
                raise ConfigError(f"profile {name} min={rng.min} must be >= 1")

    def to_dict(self) -> dict[str, list[int]]:
        """``{"batch": [min, opt, max], "seq": [...]}`` plus ``"past"`` when set."""
        data: dict[str, list[int]] = to_builtins(self)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[int]]) -> ShapeProfile:
        """Inverse of :meth:`to_dict`; unknown keys and malformed ranges raise ConfigError."""
        return convert(data, cls, "profile")


class LayerPrecision(Schema, frozen=True, kw_only=True):
    """A weakly typed TensorRT 10 build pins the layers of every ONNX node whose name matches ``pattern``
    (fnmatch) to ``dtype``."""

    pattern: str
    dtype: LayerDtype

    def __post_init__(self) -> None:
        msgspec.structs.force_setattr(self, "dtype", _member(LayerDtype, self.dtype, "layer precision dtype"))


class PluginSpec(Schema, frozen=True, kw_only=True):
    """A plugin source: a shared library path, or a Python module registering Quickly Deployable Plugins."""

    library: str | None = None
    module: str | None = None

    def __post_init__(self) -> None:
        if (self.library is None) == (self.module is None):
            raise ConfigError("a plugin spec names exactly one of a library path or a Python module")


E = TypeVar("E", bound=StrEnum)


def _member(enum: type[E], value: str, what: str) -> E:
    """``value`` as a member of ``enum`` (Python callers may pass the plain string); ConfigError otherwise."""
    try:
        return enum(value)
    except ValueError:
        known = [m.value for m in enum]
        choices = f"choose one of {', '.join(known)}{suggest(str(value), known)}"
        raise ConfigError(f"unknown {what} {value!r}; {choices}") from None


def precision_constraints(precision: Mapping[str, str]) -> tuple[LayerPrecision, ...]:
    """The fallback list of a lowered model (node -> int8/fp16/bf16/fp32, ``precision.json``) as node patterns.

    INT8 nodes need no constraint (their Q/DQ decide). Each pattern is the node name with fnmatch's special
    characters escaped; it is matched against the ONNX node each layer came from (the layer's metadata, see
    :func:`builder.backends.precision.constrained_layers`), which covers the helper layers the parser derives
    from that node and nothing else (no sibling ``name_1``).
    """
    rules = []
    for node in sorted(precision):
        dtype = precision[node]
        if dtype == "int8":
            continue
        if dtype not in {d.value for d in LayerDtype}:
            raise ConfigError(f"precision list: node {node!r} has precision {dtype!r}; use int8, fp32, fp16 or bf16")
        escaped = "".join(f"[{c}]" if c in "*?[" else c for c in node)
        rules.append(LayerPrecision(pattern=escaped, dtype=LayerDtype(dtype)))
    return tuple(rules)


def _normalize_arch(text: str) -> str:
    arch = text.strip().lower().replace("_", "").replace(".", "")
    if arch.isdigit():
        arch = "sm" + arch
    if arch not in RTX_ARCHITECTURES:
        raise ConfigError(
            f"unknown GPU architecture {text!r}; TensorRT-RTX targets {', '.join(RTX_ARCHITECTURES)}"
            f"{suggest(arch, RTX_ARCHITECTURES)} (Hopper sm90 and datacenter Blackwell sm100 are not RTX targets)"
        )
    return arch


class BuildOptions(Schema, frozen=True, kw_only=True):
    """Everything that decides an engine besides the ONNX graph itself.

    Validated on construction and on decoding (``__post_init__`` runs for both); recorded in every manifest.
    """

    backend: BackendName = BackendName.AUTO
    profiles: tuple[ShapeProfile, ...] = (
        ShapeProfile(batch=DimRange(min=1, opt=8, max=32), seq=DimRange(min=1, opt=128, max=128)),
    )
    workspace_mib: int | None = None
    optimization_level: int = 3
    timing_cache: str | None = None
    architectures: tuple[str, ...] = DEFAULT_RTX_ARCHITECTURES
    typing: Typing = Typing.STRONG
    int8_mode: Int8Mode = Int8Mode.EXPLICIT
    calibration_cache: str | None = None
    layer_precisions: tuple[LayerPrecision, ...] = ()
    plugins: tuple[PluginSpec, ...] = ()
    version: int = BUILD_OPTIONS_VERSION

    def __post_init__(self) -> None:
        if self.version != BUILD_OPTIONS_VERSION:  # also when nested in a manifest, which checks only its own
            raise ConfigError(f"build options version {self.version!r} not supported; expected {BUILD_OPTIONS_VERSION}")
        force = msgspec.structs.force_setattr
        force(self, "backend", BackendName.parse(str(self.backend)))
        force(self, "typing", _member(Typing, self.typing, "network typing"))
        force(self, "int8_mode", _member(Int8Mode, self.int8_mode, "INT8 mode"))
        if not self.profiles:
            raise ConfigError("at least one optimization profile is needed")
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"builder optimization level {self.optimization_level} not in 0..5")
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise ConfigError(f"workspace limit {self.workspace_mib} MiB must be positive")
        if not self.architectures:
            raise ConfigError("at least one target architecture is needed")
        force(self, "architectures", tuple(_normalize_arch(a) for a in self.architectures))
        if self.int8_mode is Int8Mode.IMPLICIT:
            if self.calibration_cache is None:
                raise ConfigError("implicit INT8 needs a calibration cache (--calibration-cache)")
            if self.typing is Typing.STRONG:
                raise ConfigError("implicit INT8 needs a weakly typed network (--typing weak)")
        if self.layer_precisions and self.typing is Typing.STRONG:
            raise ConfigError(
                "per-layer precision constraints need a weakly typed network (--typing weak); strongly typed "
                "networks take their fallback from Cast nodes in the graph"
            )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of these options (recorded in manifests, hashed for stage reuse)."""
        data: dict[str, Any] = to_builtins(self)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildOptions:
        """Inverse of :meth:`to_dict`: the version first, then unknown keys, types and every check above."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"build options must be a JSON object, got {type(data).__name__}")
        if data.get("version") != BUILD_OPTIONS_VERSION:
            raise ConfigError(
                f"build options version {data.get('version')!r} not supported; expected {BUILD_OPTIONS_VERSION}"
            )
        return convert(data, cls, "build options")
