"""Quantizer (weight and lowering stages): round-to-nearest symmetric weights, per output channel or per block.

    scale = float32(amax / qmax)        qmax = 2**(bits - 1) - 1 (127 for 8 bits, 7 for 4)
    q     = clip(round_half_even(W / scale), -qmax, qmax)        (a zero channel or block gets scale 1)

amax is max|W| over the output channel (or over a block of B inputs of it) with ``scale: max``, or the shrink
of it with the least squared rounding error with ``scale: mse`` (calib.weights.rtn). Per channel, the codes
are stored as INT8 behind a per-channel DequantizeLinear (TensorRT's weight contract: symmetric, zero-point 0,
axis = the output channel of the weight as stored), whatever the bit width: a 4-bit weight is an INT8 tensor
whose values lie in [-7, 7]. Per block they are stored as INT4 behind a block-wise DequantizeLinear
(builder.quant.weight_common).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from builder.quant.base import QuantizedWeight, WeightContext
from builder.quant.weight_common import CalibWeightQuantizer, WeightOptions, write_per_channel
from calib.errors import ConfigError
from calib.weights import QuantizedWeight as KnWeight
from calib.weights import RtnConfig as CalibRtnConfig
from calib.weights import rtn
from calib.weights.grid import check_bits

if TYPE_CHECKING:
    from builder.quant.base import F32

__all__ = ["RtnConfig", "RtnQuantizer", "quantize_per_channel", "write_per_channel"]


class RtnConfig(WeightOptions, frozen=True, kw_only=True):
    """Round to nearest: ``bits``, ``block`` and ``scale`` (builder.quant.weight_common.WeightOptions)."""

    def calib(self) -> CalibRtnConfig:
        return CalibRtnConfig(bits=self.bits, block=self.block, scale_method=self.scale_method)


def quantize_per_channel(w: np.ndarray, axis: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel integers of ``w`` along ``axis`` (int8 values in [-qmax, qmax]) and float32 scales.

    The division is done in float32, as TensorRT's QuantizeLinear does; np.rint rounds half to even.
    """
    check_bits(bits)
    qmax = (1 << (bits - 1)) - 1
    w = np.asarray(w, dtype=np.float32)
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=reduce_axes).astype(np.float64)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


class RtnQuantizer(CalibWeightQuantizer[RtnConfig]):
    name = "rtn"
    config_type = RtnConfig

    def quantize_kn(self, weight: F32, config: RtnConfig, ctx: WeightContext) -> KnWeight:
        del ctx
        return rtn(weight, config.calib())

    def quantize(self, weight: F32, axis: int, config: RtnConfig, ctx: WeightContext) -> QuantizedWeight:
        if not -weight.ndim <= axis < weight.ndim:
            raise ConfigError(f"GEMM {ctx.node!r}: channel axis {axis} is out of range for a weight of shape "
                              f"{weight.shape}")
        if weight.ndim != 2 and config.block is None and config.resolved_scale == "max":  # not a 2-D GEMM weight
            values, scales = quantize_per_channel(weight, axis, config.bits)
            return QuantizedWeight(values=values, scales=scales, axis=axis % weight.ndim, bits=config.bits)
        return super().quantize(weight, axis, config, ctx)
