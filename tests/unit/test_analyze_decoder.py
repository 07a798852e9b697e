"""Graph analysis of Llama-style decoders on toy graphs built in code: RMSNorm (fused and decomposed forms),
rotary embeddings, grouped-query attention, gated MLP, tied LM heads and the attention operand labels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from builder.graph.analyze import analyze
from builder.graph.render import format_report
from builder.graph.report import GraphReport, Role
from builder.graph.targets import GEMM_ROLES, OUTPUT_ROLES, calibration_tensors
from calib.errors import GraphError
from tests.toy_llama import LM_HEADS, NORMS, llama_block_model, toy_feeds, toy_roles


def _roles(report: GraphReport) -> dict[str, tuple[str, int | None]]:
    return {a.node: (a.role.value, a.layer) for a in report.assignments}


def _run(model: onnx.ModelProto) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, toy_feeds(model))[0])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("lm_head", LM_HEADS)
def test_every_role_and_layer_matches_ground_truth(norm: str, lm_head: str) -> None:
    model = llama_block_model(norm=norm, lm_head=lm_head)
    report = analyze(model, name=f"llama-{norm}-{lm_head}")
    assert _roles(report) == toy_roles(model), format_report(report)
    assert (report.architecture, report.num_layers, report.hidden_size) == ("llama", 2, 32)
    assert (report.num_heads, report.num_kv_heads, report.head_dim) == (4, 2, 8)
    assert report.pre_norm and report.warnings == ()
    expected_op = "RMSNormalization" if norm == "fused" else "RMSNorm(decomposed)"
    norms = [a for a in report.assignments if a.role in (Role.ATTN_LN, Role.FFN_LN, Role.FINAL_LN)]
    assert {a.op_type for a in norms} == {expected_op}


def test_the_norm_forms_compute_the_same_function() -> None:
    """The toy RMSNorm forms are one function (so the variants above test one model written four ways)."""
    outputs = [_run(llama_block_model(norm=norm)) for norm in NORMS]
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], rtol=0, atol=1e-4)


def test_decomposed_norm_members_and_inputs() -> None:
    model = llama_block_model(norm="cast")
    ops = {n.name: n.op_type for n in model.graph.node}
    producers = {o: n for n in model.graph.node for o in n.output}
    report = analyze(model)
    for norm in report.by_role(Role.ATTN_LN):
        assert sorted(ops[m] for m in norm.members) == sorted(
            ["Mul", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul", "Cast", "Mul"])
        assert producers[norm.inputs[0]].op_type == "Cast"  # x: the float32 Cast, kept outside the pattern


def test_rotary_is_recognised_on_q_and_k_and_never_observed_for_quantization() -> None:
    model = llama_block_model(norm="decomposed")
    report = analyze(model)
    for layer in range(2):
        rotaries = [a for a in report.in_layer(layer) if a.role == Role.ROTARY]
        assert len(rotaries) == 2 and all(a.op_type == "Rotary(decomposed)" for a in rotaries)
        assert all(len(a.members) == 7 for a in rotaries)  # Slice x2, Neg, Concat, Mul x2, Add
    assert Role.ROTARY not in GEMM_ROLES | OUTPUT_ROLES
    observed = set(calibration_tensors(model, report))
    qk_inputs = {t for a in report.by_role(Role.ATTN_QK) for t in a.inputs}
    rotated = {t for a in report.by_role(Role.ROTARY) for t in a.outputs}
    assert observed & rotated == rotated & qk_inputs  # only where the rotated Q is itself the QK^T operand
    for role in (Role.GATE_PROJ, Role.UP_PROJ, Role.LM_HEAD):
        assert all(a.inputs[0] in observed for a in report.by_role(role))


def test_grouped_query_attention_geometry_and_operands() -> None:
    for heads, kv_heads in ((4, 2), (4, 1), (4, 4)):
        report = analyze(llama_block_model(heads=heads, kv_heads=kv_heads))
        assert (report.num_heads, report.num_kv_heads) == (heads, kv_heads)
        k_proj = report.find(Role.K_PROJ, 0)
        assert k_proj is not None
    report = analyze(llama_block_model())
    for layer in range(2):
        qk, softmax, pv = (report.find(r, layer) for r in (Role.ATTN_QK, Role.ATTN_SOFTMAX, Role.ATTN_PV))
        assert qk is not None and softmax is not None and pv is not None
        assert qk.operands == ("q", "k") and pv.operands == ("p", "v")
        assert pv.inputs[0] == softmax.outputs[0]


def test_swapped_pv_inputs_are_labelled() -> None:
    """P·V written as MatMul(V', P') (the transposed product) still labels P and V by data flow."""
    model = llama_block_model(layers=1)
    pv = next(n for n in model.graph.node if n.name == next(k for k, v in toy_roles(model).items()
                                                              if v[0] == "attn_pv"))
    pv.input[0], pv.input[1] = pv.input[1], pv.input[0]  # not the same function; only labels are checked
    assert analyze(model).find(Role.ATTN_PV, 0).operands == ("v", "p")  # type: ignore[union-attr]


@pytest.mark.parametrize(("lm_head", "path_ops", "axis"), [("transpose", ["Transpose"], 0), ("gemm", [], 0),
                                                            ("untied", [], 1)])
def test_lm_head_weight_sharing_is_described(lm_head: str, path_ops: list[str], axis: int) -> None:
    model = llama_block_model(lm_head=lm_head)
    ops = {n.name: n.op_type for n in model.graph.node}
    report = analyze(model)
    (head,) = report.by_role(Role.LM_HEAD)
    assert [ops[n] for n in head.weight_path] == path_ops
    assert head.weight_axis == axis
    gather = next(n.name for n in model.graph.node if n.op_type == "Gather")
    assert head.weight_shared_with == ((gather,) if lm_head != "untied" else ())
    if lm_head != "untied":
        assert head.weight == "embed0"
    others = [a for a in report.assignments if a.weight is not None and a.role != Role.LM_HEAD]
    assert all(a.weight_path == () and a.weight_shared_with == () for a in others)


def test_one_initializer_feeding_two_gemms_lists_the_other_reader() -> None:
    model = llama_block_model(layers=1)
    report = analyze(model)
    gate, up = report.find(Role.GATE_PROJ, 0), report.find(Role.UP_PROJ, 0)
    assert gate is not None and up is not None and gate.weight is not None
    up_node = next(n for n in model.graph.node if n.name == up.node)
    up_node.input[1] = gate.weight  # gate and up now share one weight
    report = analyze(model)
    gate, up = report.find(Role.GATE_PROJ, 0), report.find(Role.UP_PROJ, 0)
    assert gate is not None and up is not None
    assert (gate.weight_shared_with, up.weight_shared_with) == ((up.node,), (gate.node,))


def test_report_round_trips_with_the_new_fields() -> None:
    report = analyze(llama_block_model(lm_head="transpose"), name="toy")
    again = GraphReport.from_json(report.to_json())
    assert again == report and again.to_json() == report.to_json()
    assert isinstance(again.assignments[0].role, Role)


def test_fused_attention_ops_are_refused_with_the_node_named() -> None:
    model = llama_block_model(layers=1)
    qk = next(n for n in model.graph.node if n.name == next(k for k, v in toy_roles(model).items()
                                                              if v[0] == "attn_qk"))
    qk.op_type, qk.domain = "Attention", "com.microsoft"
    with pytest.raises(GraphError, match=rf"node '{qk.name}' \(com.microsoft::Attention\) is a fused attention op"):
        analyze(model, name="fused")


def test_a_computed_weight_is_refused_up_front() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = helper.make_tensor("W", TensorProto.FLOAT, [4, 3], [0.5] * 12)
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Mul", ["W", "s"], ["Ws"], name="scale"),
             helper.make_node("MatMul", ["x", "Ws"], ["y"], name="gemm")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=[w, s]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(GraphError, match=r"GEMM 'gemm' computes its weight from initializer 'W' through Mul"):
        analyze(model)
