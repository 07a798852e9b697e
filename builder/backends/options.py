"""Engine-build stage: typed build options shared by every backend (profiles, limits, targets, plugins).

Options are frozen dataclasses validated on construction, so a bad flag fails before any expensive work.
They round-trip through JSON (they are recorded in every engine manifest and hashed for stage reuse).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from calib.artifact_io import versioned_object
from calib.errors import ConfigError, suggest

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


# TensorRT-RTX ahead-of-time targets (PLATFORM.md section 7); the default is NVIDIA's documented AOT set.
RTX_ARCHITECTURES: tuple[str, ...] = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
DEFAULT_RTX_ARCHITECTURES: tuple[str, ...] = ("sm80", "sm86", "sm89", "sm120")


@dataclass(frozen=True, kw_only=True)
class DimRange:
    """min/opt/max of one dynamic dimension in an optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if self.min < 1:
            raise ConfigError(f"profile dimension min={self.min} must be >= 1")
        if not self.min <= self.opt <= self.max:
            raise ConfigError(
                f"profile dimension needs min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}"
            )

    @classmethod
    def parse(cls, text: str, what: str) -> DimRange:
        """Parse ``"1,8,32"`` (min,opt,max) or a single fixed value ``"8"``."""
        parts = [p.strip() for p in text.split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"{what} {text!r} is not 'min,opt,max' of integers (for example 1,8,32)") from None
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ConfigError(f"{what} {text!r} needs one value or three (min,opt,max)")
        return cls(min=values[0], opt=values[1], max=values[2])

    def to_list(self) -> list[int]:
        return [self.min, self.opt, self.max]


@dataclass(frozen=True, kw_only=True)
class ShapeProfile:
    """One optimization profile: ranges for the batch axis (0) and sequence axis (1) of every input."""

    batch: DimRange
    seq: DimRange

    def to_dict(self) -> dict[str, list[int]]:
        return {"batch": self.batch.to_list(), "seq": self.seq.to_list()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[int]]) -> ShapeProfile:
        b, s = data["batch"], data["seq"]
        return cls(batch=DimRange(min=b[0], opt=b[1], max=b[2]), seq=DimRange(min=s[0], opt=s[1], max=s[2]))


@dataclass(frozen=True, kw_only=True)
class LayerPrecision:
    """A weakly typed TensorRT 10 build pins layers whose name matches ``pattern`` (fnmatch) to ``dtype``."""

    pattern: str
    dtype: LayerDtype


@dataclass(frozen=True, kw_only=True)
class PluginSpec:
    """A plugin source: a shared library path, or a Python module registering Quickly Deployable Plugins."""

    library: str | None = None
    module: str | None = None

    def __post_init__(self) -> None:
        if (self.library is None) == (self.module is None):
            raise ConfigError("a plugin spec names exactly one of a library path or a Python module")

    def to_dict(self) -> dict[str, str | None]:
        return {"library": self.library, "module": self.module}


def precision_constraints(precision: Mapping[str, str]) -> tuple[LayerPrecision, ...]:
    """The fallback list of a lowered model (node -> int8/fp16/bf16/fp32, ``precision.json``) as layer patterns.

    INT8 nodes need no constraint (their Q/DQ decide). Each pattern is the node name with fnmatch's special
    characters escaped, plus ``*`` for the helper layers the ONNX parser derives from one node.
    """
    rules = []
    for node in sorted(precision):
        dtype = precision[node]
        if dtype == "int8":
            continue
        if dtype not in {d.value for d in LayerDtype}:
            raise ConfigError(f"precision list: node {node!r} has precision {dtype!r}; use int8, fp32, fp16 or bf16")
        escaped = "".join(f"[{c}]" if c in "*?[" else c for c in node)
        rules.append(LayerPrecision(pattern=f"{escaped}*", dtype=LayerDtype(dtype)))
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


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    """Everything that decides an engine besides the ONNX graph itself."""

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
    version: int = field(default=BUILD_OPTIONS_VERSION)

    def __post_init__(self) -> None:
        if not self.profiles:
            raise ConfigError("at least one optimization profile is needed")
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"builder optimization level {self.optimization_level} not in 0..5")
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise ConfigError(f"workspace limit {self.workspace_mib} MiB must be positive")
        if not self.architectures:
            raise ConfigError("at least one target architecture is needed")
        object.__setattr__(self, "architectures", tuple(_normalize_arch(a) for a in self.architectures))
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
        return {
            "version": self.version,
            "backend": self.backend.value,
            "profiles": [p.to_dict() for p in self.profiles],
            "workspace_mib": self.workspace_mib,
            "optimization_level": self.optimization_level,
            "timing_cache": self.timing_cache,
            "architectures": list(self.architectures),
            "typing": self.typing.value,
            "int8_mode": self.int8_mode.value,
            "calibration_cache": self.calibration_cache,
            "layer_precisions": [{"pattern": lp.pattern, "dtype": lp.dtype.value} for lp in self.layer_precisions],
            "plugins": [p.to_dict() for p in self.plugins],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildOptions:
        data = versioned_object(data, "build options", BUILD_OPTIONS_VERSION)
        return cls(
            backend=BackendName.parse(str(data["backend"])),
            profiles=tuple(ShapeProfile.from_dict(p) for p in data["profiles"]),
            workspace_mib=data["workspace_mib"],
            optimization_level=int(data["optimization_level"]),
            timing_cache=data["timing_cache"],
            architectures=tuple(data["architectures"]),
            typing=Typing(data["typing"]),
            int8_mode=Int8Mode(data["int8_mode"]),
            calibration_cache=data["calibration_cache"],
            layer_precisions=tuple(
                LayerPrecision(pattern=lp["pattern"], dtype=LayerDtype(lp["dtype"])) for lp in data["layer_precisions"]
            ),
            plugins=tuple(PluginSpec(library=p["library"], module=p["module"]) for p in data["plugins"]),
        )
