"""Quantizer (weight and lowering stages): what the RTN, OPTQ and GPFQ weight quantizers share.

The numerics live in calib.weights, on the ONNX MatMul layout W [K, N] (K inputs, N output channels). The
WeightSet stage hands a weight quantizer the weight *as stored*, with its output-channel axis:

    MatMul(X, W[K, N])            axis 1    ->  calib.weights gets W        (no copy)
    Gemm(X, W[N, K], transB=1)    axis 0    ->  calib.weights gets W^T, and the codes come back transposed

Storage (what TensorRT builds):

* per output channel, 2..8 bits: an INT8 initializer (codes in [-qmax, qmax]) behind a per-channel
  DequantizeLinear (axis = the output-channel axis), W8A8 and WnA8 engines;
* per block of B inputs (4 bits or fewer): an ONNX INT4 initializer behind a block-wise DequantizeLinear
  (opset 21: ``axis`` = the reduction axis, ``block_size`` = B, scales of the weight's rank), the form of
  TensorRT's weight-only INT4 GEMMs (W4A16). TensorRT takes block scales only for 4-bit (and FP8/FP4) weights,
  so per-block scales with more than 4 bits are refused.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import ml_dtypes
import numpy as np
import onnx

from builder.quant.base import ConfigT, QuantizedWeight, WeightContext, WeightQuantizer
from calib.errors import ConfigError, InternalError
from calib.schema import Schema
from calib.weights import AccumulatorTarget, ScaleMethod
from calib.weights import QuantizedWeight as KnWeight
from calib.weights.accumulator import check_target
from calib.weights.grid import MAX_BITS, MIN_BITS, check_weight

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.lower.graph_edit import GraphEditor
    from builder.quant.base import F32

INT4_MAX_BITS = 4  # block-wise weights are stored as INT4
BLOCK_OPSET = 21  # DequantizeLinear with block_size and INT4 inputs
PER_CHANNEL_OPSET = 19
ScaleName = Literal["max", "mse", "auto"]


class WeightOptions(Schema, frozen=True, kw_only=True):
    """``bits`` 2..8; ``block``: one scale per block of that many inputs (None: per output channel; a block
    is stored as INT4, so it needs bits <= 4); ``scale``: ``max`` (amax / qmax), ``mse`` (the shrink of amax,
    1.00 down to 0.20, with the least squared rounding error) or ``auto`` (the quantizer's choice for the other
    options: :meth:`auto_scale`)."""

    bits: int = 8
    block: int | None = None
    scale: ScaleName = "max"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"weight bits {self.bits!r} is outside {MIN_BITS}..{MAX_BITS}")
        if self.block is not None:
            if isinstance(self.block, bool) or self.block < 1:
                raise ConfigError(f"weight block {self.block!r} must be a positive int (e.g. 128), or null for per "
                                  "output channel")
            if self.bits > INT4_MAX_BITS:
                raise ConfigError(f"weight block {self.block} with {self.bits} bits: per-block weights are stored as "
                                  f"INT4 (TensorRT takes block scales only for 4-bit weights); use bits 2..4 with a "
                                  "block, or no block for 5..8 bits")
        if self.scale not in ("max", "mse", "auto"):
            raise ConfigError(f"weight scale {self.scale!r} not supported; use max, mse or auto")

    def auto_scale(self) -> Literal["max", "mse"]:
        """What ``auto`` means for these options (max here; OPTQ overrides it)."""
        return "max"

    @property
    def resolved_scale(self) -> Literal["max", "mse"]:
        """``scale`` with ``auto`` resolved."""
        return self.auto_scale() if self.scale == "auto" else self.scale

    @property
    def scale_method(self) -> ScaleMethod:
        return ScaleMethod(self.resolved_scale)


class AxeOptions(WeightOptions, frozen=True, kw_only=True):
    """OPTQ/GPFQ options shared with AXE (Colbert et al. 2024, arXiv 2409.17092): ``act_order`` visits inputs by
    descending diag(H); ``accumulator_bits`` P (None: no constraint) makes every tile of ``tile`` inputs (None:
    all K) of every output channel safe in a signed P-bit accumulator for any ``activation_bits``-bit input in
    range (``signed_inputs``: [-2**(N-1), 2**(N-1)-1], else [0, 2**N-1]); ``soft`` adds the L1 projection before
    the strict clamp."""

    act_order: bool = False
    accumulator_bits: int | None = None
    activation_bits: int = 8
    signed_inputs: bool = True
    tile: int | None = None
    soft: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.accumulator_bits is None and self.tile is not None:
            raise ConfigError(f"accumulator tile {self.tile} without accumulator_bits: the tile is the span of one "
                              "P-bit accumulator; set accumulator_bits (e.g. 16) or drop the tile")
        target = self.target()
        if target is not None:
            if self.block is not None and (self.tile is None or self.block % self.tile):
                raise ConfigError(f"per-block scales (block {self.block}) need an accumulator tile that divides the "
                                  f"block (got {self.tile}); e.g. tile={self.block}")
            check_target(target, max(self.tile or 1, self.block or 1), self.bits, self.block)  # P large enough

    def target(self) -> AccumulatorTarget | None:
        """The calib.weights accumulator target (None without ``accumulator_bits``)."""
        if self.accumulator_bits is None:
            return None
        return AccumulatorTarget(accumulator_bits=self.accumulator_bits, activation_bits=self.activation_bits,
                                 signed_inputs=self.signed_inputs, tile=self.tile, soft=self.soft)


def to_kn(weight: F32, axis: int) -> F32:
    """The stored weight in calib.weights' [K, N] layout (output channels along axis 1)."""
    if weight.ndim != 2 or axis % 2 not in (0, 1):
        raise ConfigError(f"weight of shape {list(weight.shape)} with channel axis {axis}: only 2-D GEMM weights "
                          "are supported")
    w = np.asarray(weight, dtype=np.float32)
    return w if axis % 2 == 1 else np.ascontiguousarray(w.T)


def from_kn(q: KnWeight, axis: int) -> QuantizedWeight:
    """calib.weights' [K, N] codes back in the stored layout (scales keep [N] or [K/B, N])."""
    values = q.values if axis % 2 == 1 else np.ascontiguousarray(q.values.T)
    return QuantizedWeight(values=values, scales=q.scales, axis=axis % 2, bits=q.bits, block=q.block)


class CalibWeightQuantizer(WeightQuantizer[ConfigT]):
    """A weight quantizer computed by calib.weights on the [K, N] layout (RTN, OPTQ, GPFQ).

    ``quantized_inputs``: the quantizer reads the partially quantized model's inputs X~ (GPFQ), so the WeightSet
    stage quantizes its GEMMs in stages by depth (builder.weights.staged).
    """

    quantized_inputs: ClassVar[bool] = False

    @abc.abstractmethod
    def quantize_kn(self, weight: F32, config: ConfigT, ctx: WeightContext) -> KnWeight:
        """Codes of ``weight`` [K, N] (calib.weights layout)."""

    def quantize(self, weight: F32, axis: int, config: ConfigT, ctx: WeightContext) -> QuantizedWeight:
        return from_kn(self.quantize_kn(to_kn(weight, axis), config, ctx), axis)

    def check_shape(self, config: ConfigT, k: int, node: str) -> None:
        """ConfigError when ``config`` cannot quantize a GEMM with K inputs (a block that does not divide K, a
        tile larger than K); the WeightSet stage calls it for every GEMM before any work."""
        options: Any = config
        try:
            check_weight(np.zeros((k, 1), dtype=np.float32), options.block)
            target = options.target() if isinstance(options, AxeOptions) else None
            if target is not None:
                check_target(target, k, options.bits, options.block)
        except ConfigError as exc:
            raise ConfigError(f"GEMM {node!r} (K={k}, weight quantizer {self.name}): {exc}") from None

    def opset(self, config: ConfigT) -> int:
        """The default-domain opset the stored form needs (21 for block-wise INT4)."""
        return BLOCK_OPSET if getattr(config, "block", None) is not None else PER_CHANNEL_OPSET

    def lower(self, ctx: LoweringContext, weight: QuantizedWeight, base: str) -> str:
        if weight.block is None:
            return write_per_channel(ctx, weight, base)
        return write_int4_blocks(ctx, weight, base)


def write_per_channel(ctx: LoweringContext, weight: QuantizedWeight, base: str) -> str:
    """INT8 initializer -> DequantizeLinear(per-channel scales, axis); returns the dequantized tensor."""
    ed = ctx.ed
    q_name = ed.add_initializer(f"{base}_int8", weight.values)
    s_name = ed.add_initializer(f"{base}_scale", weight.scales)
    z_name = ed.add_initializer(f"{base}_zero_point", np.zeros(weight.scales.shape, dtype=np.int8))
    out = ed.unique(f"{base}_dequantized")
    ed.add_node("DequantizeLinear", [q_name, s_name, z_name], [out], name=f"{base}_DequantizeLinear",
                axis=weight.axis)
    return out


def write_int4_blocks(ctx: LoweringContext, weight: QuantizedWeight, base: str) -> str:
    """INT4 initializer -> block-wise DequantizeLinear (opset 21); returns the dequantized tensor.

    Stored [K, N] (axis 1): scales [K/B, N], DQ axis 0. Stored [N, K] (axis 0): scales [N, K/B], DQ axis 1. No
    zero-point input (zero, as TensorRT requires).
    """
    ed = ctx.ed
    assert weight.block is not None
    opset = next((int(o.version) for o in ed.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < BLOCK_OPSET:
        raise InternalError(f"block-wise INT4 weight {base!r} lowered into opset {opset}; lowering must raise the "
                            f"opset to {BLOCK_OPSET} first (builder.lower.opset.required_opset)")
    if weight.bits > INT4_MAX_BITS:
        raise InternalError(f"weight {base!r}: {weight.bits}-bit codes cannot be stored as INT4")
    reduction = 1 - weight.axis
    scales = weight.scales if weight.axis == 1 else np.ascontiguousarray(weight.scales.T)
    q_name = ed.add_initializer(f"{base}_int4", weight.values.astype(ml_dtypes.int4))
    s_name = ed.add_initializer(f"{base}_scale", scales)
    out = ed.unique(f"{base}_dequantized")
    ed.add_node("DequantizeLinear", [q_name, s_name], [out], name=f"{base}_DequantizeLinear", axis=reduction,
                block_size=weight.block)
    return out


def block_weight_dq(ed: GraphEditor, node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a block-wise DequantizeLinear of an INT4 initializer (checked by
    :func:`check_block_weight_dq` instead of the per-channel INT8 rules)."""
    value = ed.initializer(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
    return value is not None and value.dtype == ml_dtypes.int4


def check_block_weight_dq(ed: GraphEditor, node: onnx.NodeProto) -> None:
    """InternalError unless an INT4 weight DQ is 2-D, has a finite positive FP32 block scale of the weight's rank
    whose blocks tile the reduction axis, codes in [-7, 7] and no non-zero zero-point."""
    value = ed.initializer(node.input[0])
    scale = ed.constant_value(node.input[1]) if len(node.input) > 1 else None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert value is not None
    codes = value.astype(np.int8)
    block, axis = int(attrs.get("block_size", 0)), int(attrs.get("axis", 1))
    if scale is None or scale.dtype != np.float32 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise InternalError(f"INT4 weight DQ {node.name!r}: scale must be constant, finite, positive FP32")
    expected = list(codes.shape)
    if codes.ndim == 2 and axis in (0, 1) and block > 0 and codes.shape[axis] % block == 0:
        expected[axis] = codes.shape[axis] // block
    if codes.ndim != 2 or block <= 0 or list(scale.shape) != expected:
        raise InternalError(f"INT4 weight DQ {node.name!r}: block {block} on axis {axis} does not tile weight "
                            f"{list(codes.shape)} with scales {list(scale.shape)}")
    if codes.min(initial=0) < -7:
        raise InternalError(f"INT4 weight {node.input[0]!r}: codes must lie in [-7, 7] (symmetric narrow range)")
    zero = ed.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero is not None and np.any(zero.astype(np.int8) != 0):
        raise InternalError(f"INT4 weight DQ {node.name!r}: zero-point must be zero")
