"""Plugin room, SparqQuantize: the ONNX node contract (op type, domain, version, attributes, I/O dtypes).

Pipeline stage: lowering (a plugin-variant pass writes these nodes) and engine build (the TensorRT creator reads
the same attributes). The node fuses QuantizeLinear and SPARQ (``calib.sparq``):

    x -> SparqQuantize(scale, window_bits, placements, round_nearest, vsparq) -> y (int8) -> DequantizeLinear(scale)

Input: ``x`` [..., K] float32|float16 (rank >= 1; vSPARQ pairs along the last axis K).
Output: ``y`` [..., K] int8 = SPARQ(sat_int8(round_half_even(x / scale))), the codes the portable variant's
QuantizeLinear + composition (``builder/lower/sparq_ops.py``) produces.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from calib.errors import GraphError
from calib.sparq import Rounding, SparqConfig
from plugins.common import (
    DOMAIN,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    attributes_from_json,
    check_flag,
    check_known_keys,
    check_plugin_version,
    check_positive_finite,
)

OP_TYPE = "SparqQuantize"
SCHEMA_VERSION = 1

# attribute name -> ONNX attribute kind, as the TensorRT parser maps them (FLOAT -> FLOAT32, INT -> INT32)
ATTRIBUTE_KINDS: dict[str, str] = {
    "scale": "FLOAT",
    "window_bits": "INT",
    "placements": "INT",
    "round_nearest": "INT",
    "vsparq": "INT",
    "plugin_version": "STRING",
    "plugin_namespace": "STRING",
}
REQUIRED = ("scale", "window_bits", "placements")


@dataclass(frozen=True, kw_only=True)
class SparqQuantizeAttrs:
    """Attributes of one SparqQuantize node, validated when the node is built.

    ``scale`` is the static per-tensor activation scale (``amax / 127``), kept as its float32 value;
    ``placements`` is always explicit
    on the node (the config's resolved count), so the engine never depends on a default.
    """

    scale: float
    window_bits: int
    placements: int
    round_nearest: bool = True
    vsparq: bool = False
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_positive_finite(f"{OP_TYPE} scale", self.scale)
        # the node's FLOAT attribute, the kernel and the reference all hold the scale in float32
        with np.errstate(over="ignore"):
            single = float(np.float32(self.scale))
        object.__setattr__(self, "scale", check_positive_finite(f"{OP_TYPE} scale {self.scale!r} in float32", single))
        self.config()  # ConfigError for a window or placement count SPARQ does not have
        if self.version != SCHEMA_VERSION:
            raise GraphError(f"{OP_TYPE} schema version {self.version} is not supported; use {SCHEMA_VERSION}")

    @classmethod
    def from_config(cls, config: SparqConfig, *, scale: float) -> SparqQuantizeAttrs:
        return cls(scale=scale, window_bits=config.window_bits, placements=config.positions,
                   round_nearest=config.rounding is Rounding.NEAREST_EVEN, vsparq=config.vsparq)

    def config(self) -> SparqConfig:
        """The ``calib.sparq`` options this node applies."""
        rounding = Rounding.NEAREST_EVEN if self.round_nearest else Rounding.TRUNCATE
        return SparqConfig(window_bits=self.window_bits, placements=self.placements, rounding=rounding,
                           vsparq=self.vsparq)

    def to_onnx_attributes(self) -> dict[str, float | int | str]:
        """Node attributes in the plugin convention (flags as INT 0/1, floats as FLOAT)."""
        return {
            "scale": float(self.scale),
            "window_bits": int(self.window_bits),
            "placements": int(self.placements),
            "round_nearest": int(self.round_nearest),
            "vsparq": int(self.vsparq),
            "plugin_version": PLUGIN_VERSION,
            "plugin_namespace": PLUGIN_NAMESPACE,
        }

    @classmethod
    def from_onnx_attributes(cls, attrs: Mapping[str, Any]) -> SparqQuantizeAttrs:
        """Read and validate a node's attributes (unknown names and a foreign plugin version are errors)."""
        check_known_keys(OP_TYPE, attrs.keys(), ATTRIBUTE_KINDS)
        check_plugin_version(OP_TYPE, attrs)
        missing = [name for name in REQUIRED if name not in attrs]
        if missing:
            raise GraphError(f"{OP_TYPE} needs the attribute(s) {', '.join(missing)}")
        return cls(
            scale=float(attrs["scale"]),
            window_bits=int(attrs["window_bits"]),
            placements=int(attrs["placements"]),
            round_nearest=check_flag(f"{OP_TYPE} round_nearest", int(attrs.get("round_nearest", 1))),
            vsparq=check_flag(f"{OP_TYPE} vsparq", int(attrs.get("vsparq", 0))),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SparqQuantizeAttrs:
        return cls(**attributes_from_json(OP_TYPE, text, [f.name for f in fields(cls)]))


def check_input_shape(shape: tuple[int, ...]) -> None:
    """Raise GraphError unless ``shape`` has rank >= 1 and a last axis of at least one element."""
    if len(shape) < 1 or shape[-1] < 1:
        raise GraphError(f"{OP_TYPE} takes a tensor of rank >= 1 with a non-empty last axis; got shape {shape}")


__all__ = ["ATTRIBUTE_KINDS", "DOMAIN", "OP_TYPE", "SparqQuantizeAttrs", "check_input_shape"]
