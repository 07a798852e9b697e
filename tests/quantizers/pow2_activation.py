"""A toy activation quantizer for the registry test: per-tensor INT8 with a power-of-two scale.

    scale = 2 ** ceil(log2(headroom * max|x| / 127))          (a shift instead of a multiply in hardware)

Written only against the quantizer seam (builder.quant.base) and the lowering context: one module, one
registration, no change to any existing module.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from builder.quant.base import ActivationQuantizer, EdgeContext, Placement
from calib.errors import ConfigError
from calib.schema import Schema

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.plan.artifact import ActivationEdge
    from builder.quant.base import F32


class Pow2Config(Schema, frozen=True, kw_only=True):
    headroom: float = 1.0  # multiplies the observed max before rounding the scale up

    def __post_init__(self) -> None:
        if not self.headroom > 0:
            raise ConfigError(f"headroom {self.headroom} must be positive")


class Pow2Params(Schema, frozen=True, kw_only=True):
    exponent: int  # scale = 2 ** exponent

    @property
    def scale(self) -> np.float32:
        return np.float32(math.ldexp(1.0, self.exponent))


class Pow2Quantizer(ActivationQuantizer[Pow2Config, Pow2Params]):
    name = "toy-pow2"
    config_type = Pow2Config
    params_type = Pow2Params
    placements = frozenset({Placement.WEIGHT_INPUT})
    observers = ("minmax",)

    def decide(self, edge: EdgeContext, config: Pow2Config) -> Pow2Params:
        amax = edge.statistics.minmax.abs_max * config.headroom
        return Pow2Params(exponent=math.ceil(math.log2(amax / 127.0)))

    def describe(self, config: Pow2Config, params: Pow2Params) -> str:
        return f"pow2:headroom={config.headroom}"

    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        ctx.insert_qdq(edge.tensor, float(edge.params.scale) * 127.0, edge.consumers)

    def reference(self, x: F32, params: Pow2Params) -> F32:
        q = np.clip(np.rint(x.astype(np.float32) / params.scale), -128, 127)
        return (q * params.scale).astype(np.float32)
