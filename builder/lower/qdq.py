"""Lowering stage: Q/DQ insertion for per-tensor activations (the helper every activation quantizer uses).

TensorRT's Q/DQ contract (TensorRT developer guide, explicit quantization): symmetric, zero-point 0 of type
INT8, FP32 scales, per-channel only on weights (axis = output channel of the weight as stored), activations
per tensor, weights in [-127, 127] stored as INT8 initializers behind a DequantizeLinear.

    act:     x -> QuantizeLinear(s) -> DequantizeLinear(s) -> GEMM
    centered x -> Sub(c) -> QuantizeLinear(s) -> DequantizeLinear(s) -> GEMM -> Add(bias + c * colsum(W))
    weight:  W_int8 (initializer) -> DequantizeLinear(s[axis]) -> GEMM       (builder.quant.rtn)
"""

from __future__ import annotations

import numpy as np

from builder.lower.graph_edit import GraphEditor
from builder.plan.artifact import ALL_CONSUMERS
from calib.errors import BuildError
from calib.quant import scale_from_amax


def act_scale(amax: float) -> np.float32:
    """The FP32 activation scale float32(amax / 127) (calib.quant's convention)."""
    return scale_from_amax(amax)


def insert_qdq(ed: GraphEditor, tensor: str, amax: float, consumers: tuple[str, ...], tag: str = "",
               offset: float = 0.0) -> str:
    """Insert Q -> DQ on ``tensor``; rewire ``consumers`` (``("*",)``: every reader). Returns the DQ output.

    With an ``offset`` c (centered edges, named consumers only) the pair quantizes ``Sub(tensor, c)``; the
    consumers' biases absorb c afterwards (:func:`builder.lower.center.fold_offsets`).
    """
    base = tensor + tag
    scale = ed.add_initializer(f"{base}_scale", np.array(act_scale(amax), dtype=np.float32))
    zero = ed.add_initializer(f"{base}_zero_point", np.array(0, dtype=np.int8))
    if consumers == (ALL_CONSUMERS,):
        if offset:
            raise BuildError(f"tensor {tensor!r}: a centered Q/DQ needs named GEMM consumers to fold its offset into")
        source = ed.unique(f"{base}_prequant")
        if ed.producer(tensor) is None:
            raise BuildError(f"cannot quantize graph input {tensor!r} for every consumer")
        ed.rename_output(tensor, source)
        quantized = ed.unique(f"{base}_quantized")
        ed.add_node("QuantizeLinear", [source, scale, zero], [quantized], name=f"{base}_QuantizeLinear")
        ed.add_node("DequantizeLinear", [quantized, scale, zero], [tensor], name=f"{base}_DequantizeLinear")
        return tensor
    source = tensor
    if offset:
        center = ed.add_initializer(f"{base}_center", np.array(offset, dtype=np.float32))
        source = ed.unique(f"{base}_centered")
        ed.add_node("Sub", [tensor, center], [source], name=f"{base}_Center")
    quantized = ed.unique(f"{base}_quantized")
    dequantized = ed.unique(f"{base}_dequantized")
    ed.add_node("QuantizeLinear", [source, scale, zero], [quantized], name=f"{base}_QuantizeLinear")
    ed.add_node("DequantizeLinear", [quantized, scale, zero], [dequantized], name=f"{base}_DequantizeLinear")
    ed.redirect(consumers, tensor, dequantized)
    return dequantized
