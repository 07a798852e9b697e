"""Quantizer (planning and lowering stages): centered INT8 inputs of weight GEMMs, the offset in the bias.

TensorRT quantizes activations symmetrically with zero-point 0, which wastes up to half the INT8 codes on
a one-sided tensor (a GELU output lies in [-0.17, max]; a LayerNorm output with one-signed outlier
dimensions is skewed). A centered edge quantizes ``x - c`` instead, c the midpoint of the clipped range,
and the consumer GEMM gets the difference back through its bias (zero-point emulation):

    DQ(Q(x - c)) @ W_dq + b + c * colsum(W_dq)  ==  (DQ(Q(x - c)) + c) @ W_dq + b

``W_dq`` is the dequantized INT8 weight, so the fold is exact up to float rounding. The ``Sub`` before
QuantizeLinear is a pointwise op a builder fuses into the producer's epilogue; the GEMM stays INT8. The
planner intersects the symmetric clip [-amax, amax] of the chosen range with the observed [min, max],
giving [lo, hi]: c = (lo + hi) / 2 and the symmetric range of x - c is (hi - lo) / 2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from builder.quant.base import ActivationQuantizer, EdgeContext, Placement
from builder.quant.static import RangeName, check_range, decided_amax, range_spec
from calib.errors import BuildError, ConfigError
from calib.quant import fake_quantize, scale_from_amax
from calib.schema import Schema

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.lower.graph_edit import GraphEditor
    from builder.plan.artifact import ActivationEdge
    from builder.quant.base import F32


class CenteredConfig(Schema, frozen=True, kw_only=True):
    """``range``: how the symmetric clip is chosen before centering (``fixed`` is not offered)."""

    range: RangeName = "max"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        check_range(self.range, self.percentile)
        if self.range == "fixed":
            raise ConfigError("quantizer centered takes range max, percentile, entropy or mse, not fixed")


class CenteredParams(Schema, frozen=True, kw_only=True):
    amax: float  # half-width of [lo, hi]: the symmetric range of x - offset
    offset: float = 0.0  # c, subtracted before QuantizeLinear and folded into the consumers' biases
    centered: bool = True  # False for a constant tensor (no range left to center): a plain static edge

    def __post_init__(self) -> None:
        if not self.amax > 0.0:
            raise ConfigError(f"amax {self.amax} must be positive")


def centered_range(amax: float, observed_min: float, observed_max: float) -> tuple[float, float]:
    """(offset c, half-width h): [-amax, amax] intersected with [min, max] is [lo, hi]; c = (lo + hi) / 2,
    h = (hi - lo) / 2 (0 for a constant tensor). A one-sided tensor gets up to twice the resolution."""
    lo = max(float(observed_min), -float(amax))
    hi = min(float(observed_max), float(amax))
    if not hi > lo:
        return 0.0, 0.0
    return (lo + hi) / 2.0, (hi - lo) / 2.0


class CenteredQuantizer(ActivationQuantizer[CenteredConfig, CenteredParams]):
    name = "centered"
    config_type = CenteredConfig
    params_type = CenteredParams
    placements = frozenset({Placement.WEIGHT_INPUT})
    observers = ("minmax", "histogram")

    def decide(self, edge: EdgeContext, config: CenteredConfig) -> CenteredParams:
        amax, _ = decided_amax(edge, config.range, config.percentile)
        minmax = edge.statistics.minmax
        offset, half = centered_range(amax, minmax.minimum, minmax.maximum)
        if half > 0.0:
            return CenteredParams(amax=half, offset=offset)
        return CenteredParams(amax=amax, centered=False)

    def describe(self, config: CenteredConfig, params: CenteredParams) -> str:
        label = range_spec(config.range, config.percentile).label
        return f"{label}+center" if params.centered else label

    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        params: CenteredParams = edge.params
        ctx.insert_qdq(edge.tensor, params.amax, edge.consumers, offset=params.offset)
        if params.offset:
            ctx.after_weights(lambda: _fold_offset(ctx, edge.consumers, float(np.float32(params.offset))))

    def reference(self, x: F32, params: CenteredParams) -> F32:
        c = np.float32(params.offset)
        return (fake_quantize(x - c, scale_from_amax(params.amax)) + c).astype(np.float32)


def _gemm_weight(ctx: LoweringContext, node: onnx.NodeProto) -> tuple[np.ndarray, bool]:
    """The float weight the GEMM multiplies (float64; dequantized when INT8) and whether it is transposed."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        raise BuildError(f"centered input: consumer {node.name!r} ({node.op_type}) is not a MatMul or Gemm")
    planned = ctx.weight_edge(node.name)
    weight = ctx.dequantized(node.name) if planned is not None else ctx.ed.initializer(node.input[1])
    if weight is None:
        raise BuildError(f"centered input: GEMM {node.name!r} has no constant weight to fold the offset into")
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    if weight.ndim != 2:
        raise BuildError(f"centered input: GEMM {node.name!r} has a {weight.ndim}-D weight; a 2-D weight is needed")
    return weight.astype(np.float64), trans_b


def _shift_bias(ctx: LoweringContext, node: onnx.NodeProto, shift: np.ndarray) -> None:
    """Add ``shift`` (float64, per output channel) to the GEMM's bias, adding a bias where there is none."""
    ed = ctx.ed
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = ed.constant_value(node.input[2])
        if bias is not None and bias.shape in ((shift.size,), (1, shift.size)):
            new = (bias.astype(np.float64) + shift.reshape(bias.shape)).astype(bias.dtype)
            node.input[2] = ed.add_initializer(f"{node.input[2]}_centered", new)
            return
        _add_after(ed, node, shift)  # a C the fold cannot rewrite: the shift gets its own Add
        return
    found = ed.bias_add(node)
    if found is not None:
        add, name = found
        bias = ed.initializer(name)
        assert bias is not None  # bias_add only returns initializers
        if bias.size == shift.size:
            new = (bias.astype(np.float64) + shift).astype(bias.dtype)
            ed.replace_input(add, name, ed.add_initializer(f"{name}_centered", new))
            return
    _add_after(ed, node, shift)


def _add_after(ed: GraphEditor, node: onnx.NodeProto, shift: np.ndarray) -> None:
    """GEMM output + shift through a new Add (a GEMM without a bias the fold can rewrite)."""
    out = node.output[0]
    raw = ed.unique(f"{out}_uncentered")
    node.output[0] = raw
    offset = ed.add_initializer(f"{node.name}_center_bias", shift.astype(np.float32))
    ed.add_node("Add", [raw, offset], [out], name=f"{node.name}_CenterBias")


def _fold_offset(ctx: LoweringContext, consumers: tuple[str, ...], c: float) -> None:
    """Every consumer's bias absorbs c * colsum(W_dq) (c: the float32 value the Sub subtracts)."""
    for name in consumers:
        node = ctx.ed.node(name)
        weight, trans_b = _gemm_weight(ctx, node)
        colsum = weight.sum(axis=1 if trans_b else 0)
        _shift_bias(ctx, node, c * colsum)
