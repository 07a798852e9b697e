"""Lowering stage: HERO feature-wise scale (FWQ) folding (METHODS.md section 2.2).

For an activation X with per-feature scales S feeding GEMMs X.W:

    LN(x) / S = x_hat * (gamma / S) + beta / S          fold into the LayerNorm's gamma and beta
    X . W     = (X / S) . (diag(S) . W)                  fold S into the rows of every consuming weight

so X / S is quantized per tensor (a native Q/DQ) and W' = diag(S).W per output channel. When the LayerNorm
output also feeds the residual stream:

  * consumers = the GEMMs only: the LayerNorm is duplicated; the original keeps feeding the residual;
  * consumers = every reader ("*", LN output in INT8): the LayerNorm itself is folded, and the non-GEMM
    readers get the dequantized value multiplied back by S.

A producer that is not a LayerNorm with constant gamma/beta gets an explicit Mul by 1/S.
"""

from __future__ import annotations

import numpy as np
import onnx

from builder.lower.graph_edit import GraphEditor
from builder.lower.qdq import insert_qdq
from builder.plan.artifact import ActivationQuant, QuantPlan
from builder.recipes.model import Scheme
from calib.errors import BuildError


def _weight_index(ed: GraphEditor, node: onnx.NodeProto) -> int | None:
    if node.op_type not in ("MatMul", "Gemm"):
        return None
    for i, name in enumerate(node.input[:2]):
        if i == 1 and ed.initializer(name) is not None:
            return i
    return None


def _fold_into_weight(ed: GraphEditor, node: onnx.NodeProto, scale: np.ndarray) -> None:
    """W' = diag(S).W: scale the reduction rows of the node's weight (a new initializer)."""
    index = _weight_index(ed, node)
    assert index is not None
    w = ed.initializer(node.input[index])
    assert w is not None
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    if w.ndim != 2 or w.shape[1 if trans_b else 0] != scale.size:
        raise BuildError(f"cannot fold {scale.size} feature scales into weight {node.input[index]!r} "
                         f"of shape {w.shape}")
    folded = w * (scale[None, :] if trans_b else scale[:, None])
    node.input[index] = ed.add_initializer(f"{node.input[index]}_fwq", folded.astype(w.dtype))


def _folded_source(ed: GraphEditor, act: ActivationQuant, scale: np.ndarray) -> str:
    """A tensor equal to X / S: a folded LayerNorm output, or an explicit Mul."""
    producer = ed.producer(act.tensor)
    gamma = None if producer is None or producer.op_type != "LayerNormalization" else ed.initializer(
        producer.input[1])
    if producer is not None and gamma is not None and gamma.shape == scale.shape:
        beta = ed.initializer(producer.input[2]) if len(producer.input) > 2 and producer.input[2] else None
        inputs = [producer.input[0], ed.add_initializer(f"{producer.input[1]}_fwq", gamma / scale)]
        if beta is not None:
            inputs.append(ed.add_initializer(f"{producer.input[2]}_fwq", beta / scale))
        out = ed.unique(f"{act.tensor}_fwq")
        if act.all_consumers:
            # the LayerNorm itself is folded; readers of the original tensor get it back via x_q * S
            del producer.input[:]
            producer.input.extend(inputs)
            ed.rename_output(act.tensor, out)
        else:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in producer.attribute}
            ed.add_node("LayerNormalization", inputs, [out], name=f"{producer.name}_fwq", **attrs)
        return out
    if act.all_consumers and producer is not None:
        raw = ed.unique(f"{act.tensor}_raw")
        ed.rename_output(act.tensor, raw)
    else:
        raw = act.tensor
    inv = ed.add_initializer(f"{act.tensor}_fwq_inv_scale", (1.0 / scale).astype(np.float32))
    out = ed.unique(f"{act.tensor}_fwq")
    ed.add_node("Mul", [raw, inv], [out], name=f"{act.tensor}_fwq_Mul")
    return out


def fold_feature_scales(ed: GraphEditor, plan: QuantPlan) -> set[str]:
    """Apply every FWQ edge of the plan; returns the GEMM nodes whose weights were folded."""
    int8_weights = {w.node for w in plan.weights}
    folded_nodes: set[str] = set()
    for act in plan.activations:
        if act.scheme != Scheme.FEATURE:
            continue
        assert act.feature_scale is not None
        scale = np.asarray(act.feature_scale, dtype=np.float32)
        readers = list(ed.consumers(act.tensor))
        gemms = [n for n in readers if (act.all_consumers and n.name in int8_weights and _weight_index(ed, n))
                 or n.name in act.consumers]
        was_output = ed.is_graph_output(act.tensor)
        source = _folded_source(ed, act, scale)
        for node in gemms:
            GraphEditor.replace_input(node, act.tensor, source)
        dq = insert_qdq(ed, source, act.amax, tuple(n.name for n in gemms))
        for node in gemms:
            _fold_into_weight(ed, node, scale)
            folded_nodes.add(node.name)
        if act.all_consumers and (was_output or len(gemms) < len(readers)):
            s_name = ed.add_initializer(f"{act.tensor}_fwq_scale", scale)
            ed.add_node("Mul", [dq, s_name], [act.tensor], name=f"{act.tensor}_fwq_restore")
    return folded_nodes
