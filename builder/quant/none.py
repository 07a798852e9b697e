"""Quantizer (planning and lowering stages): ``none``, a weight GEMM's input left in float (weight-only GEMMs).

W4A16 / W8A16 engines quantize only the weight: the GEMM reads its activation in the model's float precision
and an integer weight through a DequantizeLinear (TensorRT's weight-only GEMMs; INT4 blocks:
builder.quant.weight_common). A recipe says so with ``activation: {quantizer: none}`` on INT8 weight GEMMs: the
plan records the edge (so the node's reason and the weight quantizer stay explicit) and lowering writes nothing
for it. It needs no calibration statistics of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from builder.quant.base import ActivationQuantizer, EdgeContext, Placement
from calib.schema import Schema

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.plan.artifact import ActivationEdge
    from builder.quant.base import F32


class NoneConfig(Schema, frozen=True, kw_only=True):
    """No options."""


class NoneParams(Schema, frozen=True, kw_only=True):
    """Nothing is decided."""


class NoneQuantizer(ActivationQuantizer[NoneConfig, NoneParams]):
    name = "none"
    config_type = NoneConfig
    params_type = NoneParams
    placements = frozenset({Placement.WEIGHT_INPUT})
    observers = ()

    def decide(self, edge: EdgeContext, config: NoneConfig) -> NoneParams:
        del edge, config
        return NoneParams()

    def describe(self, config: NoneConfig, params: NoneParams) -> str:
        return "none (weight-only)"

    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        del ctx, edge  # the GEMM keeps reading its float input

    def reference(self, x: F32, params: NoneParams) -> F32:
        return x
