"""Graph analysis: every role and layer of toy BERT/GPT blocks matches the ground truth their builders record."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from builder.graph.analyze import analyze
from builder.graph.render import format_report
from builder.graph.report import GraphReport, Role
from calib.errors import GraphError
from tests.toygraphs import bert_block_model, gpt_block_model, mlp_model, toy_feeds, toy_roles

VARIANTS: dict[str, Callable[[], onnx.ModelProto]] = {
    "bert-fusedln-sepqkv": lambda: bert_block_model(),
    "bert-decompln-sepqkv": lambda: bert_block_model(fused_ln=False),
    "bert-fusedln-fusedqkv": lambda: bert_block_model(fused_qkv=True),
    "bert-decompln-fusedqkv-relu": lambda: bert_block_model(fused_ln=False, fused_qkv=True, activation="relu"),
    "bert-3layers-tanh": lambda: bert_block_model(layers=3, activation="gelu_tanh"),
    "gpt-fusedln-fusedqkv": lambda: gpt_block_model(),
    "gpt-decompln-fusedqkv": lambda: gpt_block_model(fused_ln=False),
    "gpt-fusedln-sepqkv-nocausal": lambda: gpt_block_model(fused_qkv=False, causal=False),
    "gpt-decompln-sepqkv-gemm": lambda: gpt_block_model(fused_ln=False, fused_qkv=False, gemm_ffn=True),
    "gpt-3layers-erf": lambda: gpt_block_model(layers=3, activation="gelu_erf"),
}


def _roles(report: GraphReport) -> dict[str, tuple[str, int | None]]:
    return {a.node: (a.role.value, a.layer) for a in report.assignments}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_role_and_layer_matches_ground_truth(variant: str) -> None:
    model = VARIANTS[variant]()
    report = analyze(model, name=variant)
    assert _roles(report) == toy_roles(model), format_report(report)
    assert report.architecture == ("bert" if variant.startswith("bert") else "gpt")
    assert report.num_layers == (3 if "3layers" in variant else 2)
    assert report.hidden_size == 32
    assert report.warnings == ()


def test_roles_do_not_depend_on_node_names_or_node_order() -> None:
    model = gpt_block_model(fused_ln=False, fused_qkv=False)
    truth = toy_roles(model)
    rng = np.random.default_rng(1)
    renamed: dict[str, str] = {}
    for node in model.graph.node:
        renamed[node.name] = f"op{rng.integers(10**9)}"
        node.name = renamed[node.name]
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))  # no longer topologically sorted
    report = analyze(model)
    assert _roles(report) == {renamed[k]: v for k, v in truth.items()}


def test_weights_and_channel_axes() -> None:
    for model in (bert_block_model(fused_qkv=True), gpt_block_model(gemm_ffn=True)):
        inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
        nodes = {n.name: n for n in model.graph.node}
        report = analyze(model)
        gemms = [a for a in report.assignments if a.weight is not None]
        assert len(gemms) == 4 * report.num_layers  # qkv, out, fc1, fc2
        for a in gemms:
            node = nodes[a.node]
            assert a.weight == node.input[1]
            trans_b = node.op_type == "Gemm" and any(x.name == "transB" and x.i == 1 for x in node.attribute)
            assert a.weight_axis == (0 if trans_b else 1)
            out_features = {Role.QKV: 96, Role.FC1: 64}.get(a.role, 32)
            assert inits[a.weight][a.weight_axis] == out_features


def test_decomposed_patterns_list_their_members() -> None:
    report = analyze(bert_block_model(fused_ln=False, activation="gelu_erf"))
    for ln in report.by_role(Role.ATTN_LN) + report.by_role(Role.EMBED_LN):
        assert ln.op_type == "LayerNorm(decomposed)"
        assert len(ln.members) == 9  # ReduceMean Sub Pow ReduceMean Add Sqrt Div Mul Add
        assert ln.node in ln.members
    model = bert_block_model(fused_ln=False)
    ops = {n.name: n.op_type for n in model.graph.node}
    for act in analyze(model).by_role(Role.FFN_ACT):
        assert act.op_type == "Gelu(decomposed)"
        assert Counter(ops[m] for m in act.members) == Counter({"Mul": 2, "Div": 1, "Erf": 1, "Add": 1})
        fc1 = analyze(model).find(Role.FC1, act.layer)
        assert fc1 is not None
        bias_add = next(n for n in model.graph.node if fc1.outputs[0] in n.input)
        assert act.inputs == (bias_add.output[0],)


def test_gpt_final_layer_norm_and_no_embedding_ln() -> None:
    report = analyze(gpt_block_model(layers=2))
    assert len(report.by_role(Role.FINAL_LN)) == 1 and report.by_role(Role.FINAL_LN)[0].layer is None
    assert report.by_role(Role.EMBED_LN) == ()


def test_unknown_architecture_gets_generic_gemms_and_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    report = analyze(mlp_model(), name="mlp")
    assert report.architecture == "unknown" and report.num_layers == 0
    assert [(a.role, a.layer) for a in report.assignments] == [(Role.GEMM, None), (Role.GEMM, None)]
    assert report.warnings and "generic role 'gemm'" in report.warnings[0]
    assert "generic role" in caplog.text


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_model_without_gemm_is_graph_error() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [])
    with pytest.raises(GraphError, match=r"no GEMM with a constant weight.*no MatMul/Gemm"):
        analyze(model, name="relu-only")


def test_model_with_only_activation_matmuls_is_graph_error() -> None:
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], name="t"),
        helper.make_node("MatMul", ["x", "xt"], ["y"], name="mm"),
    ]
    with pytest.raises(GraphError, match="1 MatMul/Gemm nodes all multiply two activations"):
        analyze(_model(nodes, []))


def test_unnamed_nodes_are_rejected_with_a_hint() -> None:
    model = mlp_model()
    model.graph.node[2].name = ""
    with pytest.raises(GraphError, match=r"node #2 \(Relu\) has an empty or duplicate name.*name_nodes"):
        analyze(model)


def test_report_round_trips_through_json() -> None:
    report = analyze(bert_block_model(fused_ln=False, fused_qkv=True), name="toy")
    again = GraphReport.from_json(report.to_json())
    assert again == report
    assert again.to_json() == report.to_json()


def test_table_lists_every_assignment() -> None:
    report = analyze(gpt_block_model(), name="toy-gpt")
    text = format_report(report)
    assert text.splitlines()[0].startswith("model toy-gpt: architecture gpt (pre-LN")
    assert len(text.splitlines()) == 4 + len(report.assignments)  # summary, blank, header, rule
    assert all(a.node[-50:] in text for a in report.assignments)


def test_fused_and_decomposed_layer_norm_toys_compute_the_same_function() -> None:
    """The toy builders are a reference for other stages: both LayerNorm forms must agree numerically."""
    for build in (bert_block_model, gpt_block_model):
        fused, decomposed = build(fused_ln=True), build(fused_ln=False)
        feeds = toy_feeds(fused)
        outs = [
            ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for m in (fused, decomposed)
        ]
        np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("op", "trans_b", "behind_transpose", "expected_axis"),
    [("Gemm", 0, False, 1), ("Gemm", 1, False, 0), ("MatMul", 0, False, 1), ("MatMul", 0, True, 0)],
)
def test_weight_axis_is_the_output_channel_axis_of_the_initializer(
    op: str, trans_b: int, behind_transpose: bool, expected_axis: int
) -> None:
    """y = x @ W' with x [2, 4] and 3 output channels; the initializer is stored [4, 3] or [3, 4]."""
    stored_nk = trans_b == 1 or behind_transpose
    weight = helper.make_tensor("W", TensorProto.FLOAT, [3, 4] if stored_nk else [4, 3], [0.5] * 12)
    nodes = []
    b_input = "W"
    if behind_transpose:
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]))
        b_input = "Wt"
    attrs = {"transB": trans_b} if op == "Gemm" else {}
    nodes.append(helper.make_node(op, ["x", b_input], ["y"], name="gemm", **attrs))
    model = _model(nodes, [weight])
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # the toy graph is valid
    (a,) = analyze(model).assignments
    assert (a.role, a.weight, a.weight_axis) == (Role.GEMM, "W", expected_axis)
    assert tuple(weight.dims)[expected_axis] == 3


def test_blocks_without_layer_norm_keep_their_roles_and_warn() -> None:
    """Normalization we do not recognise (here: none at all) leaves the blocks and their layers intact."""
    model = bert_block_model()
    truth = toy_roles(model)
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]
    report = analyze(model)
    assert report.architecture == "unknown" and report.num_layers == 2
    assert _roles(report) == {k: v for k, v in truth.items() if not v[0].endswith("_ln")}
    assert any("no LayerNorm" in w for w in report.warnings)
