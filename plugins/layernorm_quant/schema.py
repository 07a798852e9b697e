"""Plugin room, LayerNormQuantize: the ONNX node contract (op type, domain, version, attributes, I/O dtypes).

Pipeline stage: lowering (``builder.lower.fuse_plugins`` writes these nodes) and engine build (the TensorRT
creator reads the same attributes). Imports only numpy-free project modules, so ``calib`` may use it.

Inputs (ONNX order): ``x`` [..., H] float32|float16, ``gamma`` [H], ``beta`` [H] (same dtype as ``x``),
optional ``residual`` [..., H] (same shape and dtype as ``x``; the node normalizes ``x + residual``).
Outputs (ONNX order): ``y`` [..., H] int8; if ``per_token``: ``token_scale`` [..., 1] float32;
if ``emit_normalized``: ``normalized`` [..., H] with the dtype of ``x`` (the residual path's copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from plugins.common import DOMAIN, PluginAttributes, check_positive_finite

OP_TYPE = "LayerNormQuantize"
SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class LayerNormQuantizeAttrs(PluginAttributes):
    """Attributes of one LayerNormQuantize node, validated at graph-building time.

    ``scale`` is the static output scale (``amax / 127``); with ``per_token`` the kernel derives one scale per
    row (absmax / 127) instead, outputs it, and the static ``scale`` attribute is not used (kept at 1.0).
    """

    OP_TYPE: ClassVar[str] = OP_TYPE
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

    epsilon: float
    scale: float = 1.0
    per_token: bool = False
    has_residual: bool = False
    emit_normalized: bool = False
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        check_positive_finite(f"{OP_TYPE} epsilon", self.epsilon)
        check_positive_finite(f"{OP_TYPE} scale", self.scale)
        self.check_version()

    @property
    def num_inputs(self) -> int:
        return 4 if self.has_residual else 3

    @property
    def num_outputs(self) -> int:
        return 1 + int(self.per_token) + int(self.emit_normalized)


# attribute name -> ONNX attribute kind, as the TensorRT parser maps them (FLOAT -> FLOAT32, INT -> INT32)
ATTRIBUTE_KINDS: dict[str, str] = LayerNormQuantizeAttrs.attribute_kinds()

__all__ = ["ATTRIBUTE_KINDS", "DOMAIN", "OP_TYPE", "LayerNormQuantizeAttrs"]
