"""Lowering stage: centered INT8 inputs of weight GEMMs, the offset folded into the GEMM bias.

TensorRT quantizes activations symmetrically with zero-point 0, which wastes up to half the INT8 codes on
a one-sided tensor (a GELU output lies in [-0.17, max]; a LayerNorm output with one-signed outlier
dimensions is skewed). A centered edge quantizes ``x - c`` instead, c the midpoint of the clipped range,
and the consumer GEMM gets the difference back through its bias (zero-point emulation):

    DQ(Q(x - c)) @ W_dq + b + c * colsum(W_dq)  ==  (DQ(Q(x - c)) + c) @ W_dq + b

``W_dq`` is the dequantized INT8 weight, so the fold is exact up to float rounding. The ``Sub`` before
QuantizeLinear is a pointwise op a builder fuses into the producer's epilogue; the GEMM stays INT8.
This pass runs after the weights are quantized (inside the ``qdq`` pass of :mod:`builder.lower.pipeline`).
"""

from __future__ import annotations

import numpy as np
import onnx

from builder.lower.graph_edit import GraphEditor
from builder.plan.artifact import QuantPlan
from calib.errors import BuildError


def _gemm_weight(ed: GraphEditor, node: onnx.NodeProto) -> tuple[np.ndarray, bool]:
    """The dequantized weight the GEMM reads (float64) and whether it is stored transposed (Gemm transB=1)."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        raise BuildError(f"centered input: consumer {node.name!r} ({node.op_type}) is not a MatMul or Gemm")
    name = node.input[1]
    weight = ed.initializer(name)
    if weight is None:
        dq = ed.producer(name)
        q = ed.initializer(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        scale = ed.constant_value(dq.input[1]) if dq is not None and q is not None else None
        if dq is None or q is None or scale is None:
            raise BuildError(f"centered input: GEMM {node.name!r} has no constant weight to fold the offset into")
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        weight = q.astype(np.float32) * scale.astype(np.float32).reshape(shape)  # DequantizeLinear in FP32
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    if weight.ndim != 2:
        raise BuildError(f"centered input: GEMM {node.name!r} has a {weight.ndim}-D weight; a 2-D weight is needed")
    return weight.astype(np.float64), trans_b


def _shift_bias(ed: GraphEditor, node: onnx.NodeProto, shift: np.ndarray) -> None:
    """Add ``shift`` (float64, per output channel) to the GEMM's bias, adding a bias where there is none."""
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = ed.constant_value(node.input[2])
        if bias is None:
            raise BuildError(f"centered input: Gemm {node.name!r} has a non-constant C input")
        new = (bias.astype(np.float64) + shift).astype(bias.dtype)
        node.input[2] = ed.add_initializer(f"{node.input[2]}_centered", new)
        return
    found = ed.bias_add(node)
    if found is not None:
        add, name = found
        bias = ed.initializer(name)
        assert bias is not None  # bias_add only returns initializers
        if bias.size == shift.size:
            new = (bias.astype(np.float64) + shift).astype(bias.dtype)
            GraphEditor.replace_input(add, name, ed.add_initializer(f"{name}_centered", new))
            return
    out = node.output[0]
    raw = ed.unique(f"{out}_uncentered")
    node.output[0] = raw
    offset = ed.add_initializer(f"{node.name}_center_bias", shift.astype(np.float32))
    ed.add_node("Add", [raw, offset], [out], name=f"{node.name}_CenterBias")


def fold_offsets(ed: GraphEditor, plan: QuantPlan) -> None:
    """For every centered edge, add ``c * colsum(W_dq)`` to each consumer GEMM's bias."""
    for act in plan.activations:
        if not act.offset:
            continue
        c = float(np.float32(act.offset))  # the value the Sub subtracts
        for name in act.consumers:
            node = ed.node(name)
            weight, trans_b = _gemm_weight(ed, node)
            colsum = weight.sum(axis=1 if trans_b else 0)
            _shift_bias(ed, node, c * colsum)
