"""Which tensors calibration observes, from a hand-made GraphReport on a toy graph."""

from __future__ import annotations

import onnx
import pytest

from builder.graph.report import GraphReport, Role, RoleAssignment
from builder.graph.targets import calibration_tensors, fallback_tensors
from calib.errors import GraphError
from tests.toygraphs import bert_block_model, toy_roles


def _report(model: onnx.ModelProto) -> GraphReport:
    """Roles from the toy builder's ground truth, with inputs/outputs read off the graph (no analysis code)."""
    inits = {i.name for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    assignments = []
    for name, (role, layer) in toy_roles(model).items():
        node = nodes[name]
        weight = next((i for i in node.input if i in inits), None)
        assignments.append(RoleAssignment(node=name, op_type=node.op_type, role=Role(role), layer=layer,
                                          inputs=tuple(i for i in node.input if i not in inits),
                                          outputs=tuple(node.output), weight=weight))
    return GraphReport(model_name="toy", architecture="bert", num_layers=2, hidden_size=32,
                       assignments=tuple(assignments))


def test_tensors_cover_gemm_inputs_and_role_outputs_in_graph_order() -> None:
    model = bert_block_model(layers=2)
    report = _report(model)
    tensors = calibration_tensors(model, report)
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    assert [order[t] for t in tensors] == sorted(order[t] for t in tensors)
    assert len(tensors) == len(set(tensors))
    for a in report.assignments:
        if a.role in (Role.Q_PROJ, Role.FC1, Role.FC2, Role.ATTN_OUT, Role.ATTN_QK, Role.ATTN_PV):
            assert set(a.inputs) <= set(tensors), a.role
        if a.role in (Role.ATTN_SOFTMAX, Role.FFN_RESIDUAL, Role.ATTN_RESIDUAL, Role.FC2, Role.EMBED_LN):
            assert set(a.outputs) <= set(tensors), a.role
    inits = {i.name for i in model.graph.initializer}
    assert not set(tensors) & inits


def test_a_report_of_another_model_is_rejected() -> None:
    model = bert_block_model(layers=1)
    other = _report(bert_block_model(layers=2))
    with pytest.raises(GraphError, match="names tensors the model does not have"):
        calibration_tensors(model, other)


def test_fallback_without_a_report_takes_matmul_inputs_and_norm_outputs() -> None:
    model = bert_block_model(layers=1)
    tensors = fallback_tensors(model)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert all(n.input[0] in tensors for n in matmuls)
    assert all(n.output[0] in tensors for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax"))
