"""Plugin room, LayerNormQuantize: the ONNX node contract (op type, domain, version, attributes, I/O dtypes).

Pipeline stage: lowering (``builder.lower.fuse_plugins`` writes these nodes) and engine build (the TensorRT
creator reads the same attributes). Imports only numpy-free project modules, so ``calib`` may use it.

Inputs (ONNX order): ``x`` [..., H] float32|float16, ``gamma`` [H], ``beta`` [H] (same dtype as ``x``),
optional ``residual`` [..., H] (same shape and dtype as ``x``; the node normalizes ``x + residual``).
Outputs (ONNX order): ``y`` [..., H] int8; if ``per_token``: ``token_scale`` [..., 1] float32;
if ``emit_normalized``: ``normalized`` [..., H] with the dtype of ``x`` (the residual path's copy).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from calib.errors import GraphError
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

OP_TYPE = "LayerNormQuantize"
SCHEMA_VERSION = 1

# attribute name -> ONNX attribute kind, as the TensorRT parser maps them (FLOAT -> FLOAT32, INT -> INT32)
ATTRIBUTE_KINDS: dict[str, str] = {
    "epsilon": "FLOAT",
    "scale": "FLOAT",
    "per_token": "INT",
    "has_residual": "INT",
    "emit_normalized": "INT",
    "plugin_version": "STRING",
    "plugin_namespace": "STRING",
}


@dataclass(frozen=True, kw_only=True)
class LayerNormQuantizeAttrs:
    """Attributes of one LayerNormQuantize node, validated at graph-building time.

    ``scale`` is the static output scale (``amax / 127``); with ``per_token`` the kernel derives one scale per
    row (absmax / 127) instead, outputs it, and the static ``scale`` attribute is not used (kept at 1.0).
    """

    epsilon: float
    scale: float = 1.0
    per_token: bool = False
    has_residual: bool = False
    emit_normalized: bool = False
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_positive_finite(f"{OP_TYPE} epsilon", self.epsilon)
        check_positive_finite(f"{OP_TYPE} scale", self.scale)
        if self.version != SCHEMA_VERSION:
            raise GraphError(f"{OP_TYPE} schema version {self.version} is not supported; use {SCHEMA_VERSION}")

    @property
    def num_inputs(self) -> int:
        return 4 if self.has_residual else 3

    @property
    def num_outputs(self) -> int:
        return 1 + int(self.per_token) + int(self.emit_normalized)

    def to_onnx_attributes(self) -> dict[str, float | int | str]:
        """Node attributes in the plugin convention (flags as INT 0/1, floats as FLOAT)."""
        return {
            "epsilon": float(self.epsilon),
            "scale": float(self.scale),
            "per_token": int(self.per_token),
            "has_residual": int(self.has_residual),
            "emit_normalized": int(self.emit_normalized),
            "plugin_version": PLUGIN_VERSION,
            "plugin_namespace": PLUGIN_NAMESPACE,
        }

    @classmethod
    def from_onnx_attributes(cls, attrs: Mapping[str, Any]) -> LayerNormQuantizeAttrs:
        """Read and validate a node's attributes (unknown names and a foreign plugin version are errors)."""
        check_known_keys(OP_TYPE, attrs.keys(), ATTRIBUTE_KINDS)
        check_plugin_version(OP_TYPE, attrs)
        if "epsilon" not in attrs:
            raise GraphError(f"{OP_TYPE} needs the FLOAT attribute 'epsilon'")
        return cls(
            epsilon=float(attrs["epsilon"]),
            scale=float(attrs.get("scale", 1.0)),
            per_token=check_flag(f"{OP_TYPE} per_token", int(attrs.get("per_token", 0))),
            has_residual=check_flag(f"{OP_TYPE} has_residual", int(attrs.get("has_residual", 0))),
            emit_normalized=check_flag(f"{OP_TYPE} emit_normalized", int(attrs.get("emit_normalized", 0))),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LayerNormQuantizeAttrs:
        return cls(**attributes_from_json(OP_TYPE, text, [f.name for f in fields(cls)]))


__all__ = ["ATTRIBUTE_KINDS", "DOMAIN", "OP_TYPE", "LayerNormQuantizeAttrs"]
