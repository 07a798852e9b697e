"""A toy weight quantizer for the registry test: ternary weights {-1, 0, +1} x a per-channel scale.

    scale_c = mean |W[:, c]| over the entries above threshold * max|W[:, c]|;  q = sign(W) where |W| > threshold

Stored as an INT8 initializer behind a per-channel DequantizeLinear, like every weight TensorRT builds.
One module, one registration, no change to any existing module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from builder.quant.base import QuantizedWeight, WeightContext, WeightQuantizer
from calib.errors import ConfigError
from calib.schema import Schema

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.quant.base import F32


class TernaryConfig(Schema, frozen=True, kw_only=True):
    threshold: float = 0.5  # fraction of the channel's max|w| below which a weight becomes 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"threshold {self.threshold} is outside [0, 1)")


def ternarize(w: np.ndarray, axis: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(values in {-1, 0, 1} as int8, float32 scale per output channel along ``axis``)."""
    w = np.asarray(w, dtype=np.float32)
    reduce = 1 - axis
    keep = np.abs(w) > threshold * np.max(np.abs(w), axis=reduce, keepdims=True)
    values = (np.sign(w) * keep).astype(np.int8)
    kept = np.maximum(np.sum(keep, axis=reduce), 1)
    scale = (np.sum(np.abs(w) * keep, axis=reduce) / kept).astype(np.float32)
    return values, np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


class TernaryQuantizer(WeightQuantizer[TernaryConfig]):
    name = "toy-ternary"
    config_type = TernaryConfig

    def quantize(self, weight: F32, axis: int, config: TernaryConfig, ctx: WeightContext) -> QuantizedWeight:
        values, scales = ternarize(weight, axis, config.threshold)
        return QuantizedWeight(values=values, scales=scales, axis=axis, bits=2)

    def lower(self, ctx: LoweringContext, weight: QuantizedWeight, base: str) -> str:
        ed = ctx.ed
        q = ed.add_initializer(f"{base}_ternary", weight.values)
        s = ed.add_initializer(f"{base}_ternary_scale", weight.scales)
        z = ed.add_initializer(f"{base}_ternary_zero", np.zeros(weight.scales.shape, dtype=np.int8))
        out = ed.unique(f"{base}_ternary_dequantized")
        ed.add_node("DequantizeLinear", [q, s, z], [out], name=f"{base}_ternary_DQ", axis=weight.axis)
        return out
