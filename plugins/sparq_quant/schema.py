"""Plugin room, SparqQuantize: the ONNX node contract (op type, domain, version, attributes, I/O dtypes).

Pipeline stage: lowering (a plugin-variant pass writes these nodes) and engine build (the TensorRT creator reads
the same attributes). The node fuses QuantizeLinear and SPARQ (``calib.sparq``):

    x -> SparqQuantize(scale, window_bits, placements, round_nearest, vsparq) -> y (int8) -> DequantizeLinear(scale)

Input: ``x`` [..., K] float32|float16 (rank >= 1; vSPARQ pairs along the last axis K).
Output: ``y`` [..., K] int8 = SPARQ(sat_int8(round_half_even(x / scale))), the codes the portable variant's
QuantizeLinear + composition (``builder/lower/sparq_ops.py``) produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from calib.errors import GraphError
from calib.sparq import Rounding, SparqConfig
from plugins.common import DOMAIN, PluginAttributes, check_positive_finite

OP_TYPE = "SparqQuantize"
SCHEMA_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class SparqQuantizeAttrs(PluginAttributes):
    """Attributes of one SparqQuantize node, validated when the node is built.

    ``scale`` is the static per-tensor activation scale (``amax / 127``), kept as its float32 value;
    ``placements`` is always explicit on the node (the config's resolved count), so the engine never depends on
    a default.
    """

    OP_TYPE: ClassVar[str] = OP_TYPE
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION

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
        self.check_version()

    @classmethod
    def from_config(cls, config: SparqConfig, *, scale: float) -> SparqQuantizeAttrs:
        return cls(scale=scale, window_bits=config.window_bits, placements=config.positions,
                   round_nearest=config.rounding is Rounding.NEAREST_EVEN, vsparq=config.vsparq)

    def config(self) -> SparqConfig:
        """The ``calib.sparq`` options this node applies."""
        rounding = Rounding.NEAREST_EVEN if self.round_nearest else Rounding.TRUNCATE
        return SparqConfig(window_bits=self.window_bits, placements=self.placements, rounding=rounding,
                           vsparq=self.vsparq)


# attribute name -> ONNX attribute kind, as the TensorRT parser maps them (FLOAT -> FLOAT32, INT -> INT32)
ATTRIBUTE_KINDS: dict[str, str] = SparqQuantizeAttrs.attribute_kinds()


def check_input_shape(shape: tuple[int, ...]) -> None:
    """Raise GraphError unless ``shape`` has rank >= 1 and a last axis of at least one element."""
    if len(shape) < 1 or shape[-1] < 1:
        raise GraphError(f"{OP_TYPE} takes a tensor of rank >= 1 with a non-empty last axis; got shape {shape}")


__all__ = ["ATTRIBUTE_KINDS", "DOMAIN", "OP_TYPE", "SparqQuantizeAttrs", "check_input_shape"]
