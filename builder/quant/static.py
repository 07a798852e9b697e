"""Quantizer (planning and lowering stages): static per-tensor symmetric INT8, the plain TensorRT Q/DQ pair.

    x -> QuantizeLinear(s) -> DequantizeLinear(s) -> consumers          s = float32(amax / 127)

``amax`` comes from a range method applied to the tensor's Statistics (max, percentile, entropy, mse) or is
fixed without calibration (a softmax output lies in [0, 1]: amax 1.0). HERO's SQ scheme and the attention
operands use it; one scale may be shared by the Q, K and V operands of one attention.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from builder.quant.base import ActivationQuantizer, EdgeContext, Placement
from calib.errors import ConfigError
from calib.quant import fake_quantize, scale_from_amax
from calib.range_table import RangeMethod
from calib.ranges import RangeSpec, tensor_amax
from calib.schema import Schema

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.plan.artifact import ActivationEdge
    from builder.quant.base import F32

RangeName = Literal["max", "percentile", "entropy", "mse", "fixed"]


class StaticConfig(Schema, frozen=True, kw_only=True):
    """``range``: how amax is chosen; ``percentile`` with range percentile; ``amax`` with range fixed."""

    range: RangeName = "max"
    percentile: float = 99.99
    amax: float | None = None

    def __post_init__(self) -> None:
        check_range(self.range, self.percentile)
        if self.range == "fixed" and not (self.amax is not None and self.amax > 0.0):
            raise ConfigError(f"range fixed needs a positive amax (e.g. amax: 1.0 for a softmax output), "
                              f"got {self.amax!r}")
        if self.range != "fixed" and self.amax is not None:
            raise ConfigError(f"amax {self.amax} is only used with range fixed, not range {self.range!r}")


def check_range(range_: str, percentile: float) -> None:
    if not 50.0 < percentile <= 100.0:
        raise ConfigError(f"percentile {percentile} is outside (50, 100]")
    del range_


def range_spec(range_: str, percentile: float) -> RangeSpec:
    """The calibration range method of a recipe's ``range`` (not ``fixed``)."""
    method = RangeMethod(range_)
    return RangeSpec(method=method, percentile=percentile if method == RangeMethod.PERCENTILE else None)


def decided_amax(edge: EdgeContext, range_: str, percentile: float) -> tuple[float, str]:
    """(amax, method label) of a range choice from the edge's statistics."""
    spec = range_spec(range_, percentile)
    return tensor_amax(edge.statistics, spec), spec.label


class StaticParams(Schema, frozen=True, kw_only=True):
    amax: float  # symmetric range of the quantized tensor: scale = amax / 127

    def __post_init__(self) -> None:
        if not self.amax > 0.0:
            raise ConfigError(f"amax {self.amax} must be positive")


class StaticQuantizer(ActivationQuantizer[StaticConfig, StaticParams]):
    name = "static"
    config_type = StaticConfig
    params_type = StaticParams
    placements = frozenset({Placement.WEIGHT_INPUT, Placement.OPERAND, Placement.OUTPUT})
    observers = ("minmax", "histogram")
    joins_scale_groups = True

    def decide(self, edge: EdgeContext, config: StaticConfig) -> StaticParams:
        if config.range == "fixed":
            assert config.amax is not None
            return StaticParams(amax=float(config.amax))
        amax, _ = decided_amax(edge, config.range, config.percentile)
        return StaticParams(amax=amax)

    def describe(self, config: StaticConfig, params: StaticParams) -> str:
        return "fixed" if config.range == "fixed" else range_spec(config.range, config.percentile).label

    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        ctx.insert_qdq(edge.tensor, edge.params.amax, edge.consumers)

    def reference(self, x: F32, params: StaticParams) -> F32:
        return fake_quantize(x, scale_from_amax(params.amax))
