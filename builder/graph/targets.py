"""Analysis stage: which activation tensors calibration observes, from the GraphReport.

Observed (deduplicated, in graph order):

* activation inputs of every GEMM role (QKV, Q/K/V projections, W_o, FC1, gate/up projections, FC2, the LM
  head, unrecognised GEMMs), and both operands of Q·K^T (ATTN_QK) and P·V (ATTN_PV);
* outputs of every LayerNorm role, the softmax, the FFN activation, FC2 and both residual adds (the tensors
  Bondarenko et al. name x, h, y and the outlier report plots).
"""

from __future__ import annotations

import onnx

from builder.graph.report import GraphReport, Role
from calib.errors import GraphError

GEMM_ROLES = frozenset({Role.QKV, Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_OUT, Role.FC1, Role.GATE_PROJ,
                        Role.UP_PROJ, Role.FC2, Role.LM_HEAD, Role.GEMM, Role.ATTN_QK, Role.ATTN_PV})
OUTPUT_ROLES = frozenset({Role.EMBED_LN, Role.ATTN_LN, Role.FFN_LN, Role.FINAL_LN, Role.ATTN_SOFTMAX, Role.FFN_ACT,
                          Role.FC2, Role.ATTN_RESIDUAL, Role.FFN_RESIDUAL})


def calibration_tensors(model: onnx.ModelProto, report: GraphReport) -> list[str]:
    """Names of the activation tensors to observe, in the order the graph produces them.

    Raises GraphError when the report names a tensor the model does not have (a report of another model).
    """
    initializers = {init.name for init in model.graph.initializer}
    order: dict[str, int] = {i.name: -1 for i in model.graph.input}
    for index, node in enumerate(model.graph.node):
        for out in node.output:
            if out:
                order.setdefault(out, index)
    wanted: list[str] = []
    for assignment in report.assignments:
        if assignment.role in GEMM_ROLES:
            wanted.extend(t for t in assignment.inputs if t and t not in initializers and t != assignment.weight)
        if assignment.role in OUTPUT_ROLES:
            wanted.extend(t for t in assignment.outputs if t)
    unknown = sorted({t for t in wanted if t not in order})
    if unknown:
        raise GraphError(f"the GraphReport of {report.model_name!r} names tensors the model does not have: "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    unique = list(dict.fromkeys(wanted))
    return sorted(unique, key=order.__getitem__)  # stable: ties keep report order


def fallback_tensors(model: onnx.ModelProto) -> list[str]:
    """Without a GraphReport: activation inputs of every MatMul/Gemm and outputs of LayerNorm and Softmax."""
    initializers = {init.name for init in model.graph.initializer}
    constants = {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    wanted: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            wanted.extend(t for t in node.input[:2] if t and t not in initializers and t not in constants)
        elif node.op_type in ("LayerNormalization", "Softmax"):
            wanted.append(node.output[0])
    return list(dict.fromkeys(wanted))
