"""Lowering stage: the Bondarenko PEG rewrite (METHODS.md section 3.3) for per-tensor INT8 hardware.

For a consumer Y = X.W and K embedding groups G_k (a range-sorted permutation split into equal parts):

    Y = sum_k X[:, G_k] . W[G_k, :]

    X --Gather(G_0)--> Q/DQ(s_0) --MatMul(W[G_0,:])--\
    X --Gather(G_1)--> Q/DQ(s_1) --MatMul(W[G_1,:])---Sum--> Y
    ...                                               /

Each group is an ordinary per-tensor Q/DQ and each partial product an INT8 GEMM with per-channel weights.
The groups are formed with Gather (index lists) rather than by folding the permutation into the producers,
so the residual stream is untouched; the Gathers and Q/DQs are shared by every consumer of X.
"""

from __future__ import annotations

import numpy as np
import onnx

from builder.lower.graph_edit import GraphEditor
from builder.lower.qdq import act_scale, quantize_weight
from builder.plan.artifact import ActivationQuant, QuantPlan
from builder.recipes.model import Scheme
from calib.errors import BuildError


def _group_inputs(ed: GraphEditor, act: ActivationQuant) -> list[str]:
    outs = []
    for k, group in enumerate(act.groups):
        idx = ed.add_initializer(f"{act.tensor}_peg{k}_dims", np.asarray(group.dims, dtype=np.int64))
        gathered = ed.unique(f"{act.tensor}_peg{k}")
        ed.add_node("Gather", [act.tensor, idx], [gathered], name=f"{act.tensor}_peg{k}_Gather", axis=-1)
        outs.append(_qdq_shared(ed, gathered, group.amax))
    return outs


def _qdq_shared(ed: GraphEditor, tensor: str, amax: float) -> str:
    """Q -> DQ on a fresh tensor whose readers are created afterwards."""
    scale = ed.add_initializer(f"{tensor}_scale", np.array(act_scale(amax), dtype=np.float32))
    zero = ed.add_initializer(f"{tensor}_zero_point", np.array(0, dtype=np.int8))
    quantized = ed.unique(f"{tensor}_quantized")
    dequantized = ed.unique(f"{tensor}_dequantized")
    ed.add_node("QuantizeLinear", [tensor, scale, zero], [quantized], name=f"{tensor}_QuantizeLinear")
    ed.add_node("DequantizeLinear", [quantized, scale, zero], [dequantized], name=f"{tensor}_DequantizeLinear")
    return dequantized


def _gemm_layout(node: onnx.NodeProto, name: str, tensor: str) -> tuple[int, int]:
    """(row axis of the weight that the input features index, output-channel axis) for MatMul or Gemm."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[0] == tensor:
        return 0, 1
    if (node.op_type == "Gemm" and node.input[0] == tensor and not attrs.get("transA", 0)
            and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
        return (1, 0) if attrs.get("transB", 0) else (0, 1)
    raise BuildError(f"PEG needs MatMul({tensor}, W) or Gemm({tensor}, W[, C]) consumers (no transA, alpha = beta "
                     f"= 1); {name!r} is {node.op_type}")


def _split_consumer(ed: GraphEditor, act: ActivationQuant, name: str, inputs: list[str], int8: bool) -> None:
    node = ed.node(name)
    row_axis, out_axis = _gemm_layout(node, name, act.tensor)
    w = ed.initializer(node.input[1])
    if w is None or w.ndim != 2:
        raise BuildError(f"PEG consumer {name!r} has no 2-D weight initializer")
    partials = []
    for k, (group, x_k) in enumerate(zip(act.groups, inputs, strict=True)):
        w_k = np.take(w, np.asarray(group.dims, dtype=np.int64), axis=row_axis)
        if int8:
            q, scale = quantize_weight(w_k, axis=out_axis)
            q_name = ed.add_initializer(f"{node.input[1]}_peg{k}_int8", q)
            s_name = ed.add_initializer(f"{node.input[1]}_peg{k}_scale", scale)
            z_name = ed.add_initializer(f"{node.input[1]}_peg{k}_zero_point", np.zeros(scale.shape, np.int8))
            w_name = ed.unique(f"{node.input[1]}_peg{k}_dequantized")
            ed.add_node("DequantizeLinear", [q_name, s_name, z_name], [w_name],
                        name=f"{node.input[1]}_peg{k}_DequantizeLinear", axis=out_axis)
        else:
            w_name = ed.add_initializer(f"{node.input[1]}_peg{k}", w_k)
        out = ed.unique(f"{node.output[0]}_peg{k}")
        if node.op_type == "Gemm":
            ed.add_node("Gemm", [x_k, w_name], [out], name=f"{name}_peg{k}", transB=row_axis)
        else:
            ed.add_node("MatMul", [x_k, w_name], [out], name=f"{name}_peg{k}")
        partials.append(out)
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    total = ed.unique(f"{node.output[0]}_peg_sum") if bias else node.output[0]
    ed.add_node("Sum", partials, [total], name=f"{name}_peg_sum")
    if bias:
        ed.add_node("Add", [total, bias], [node.output[0]], name=f"{name}_peg_bias")
    ed.remove_node(node)


def rewrite_peg(ed: GraphEditor, plan: QuantPlan) -> set[str]:
    """Apply every PEG edge of the plan; returns the consumer nodes that were split (and quantized)."""
    int8 = {w.node for w in plan.weights}
    split: set[str] = set()
    for act in plan.activations:
        if act.scheme != Scheme.PEG:
            continue
        inputs = _group_inputs(ed, act)
        for name in act.consumers:
            _split_consumer(ed, act, name, inputs, name in int8)
            split.add(name)
    return split
