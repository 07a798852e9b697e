"""Lowering's Identity-alias pre-pass (builder.lower.graph_edit.GraphEditor.inline_constant_aliases).

Exporters deduplicate a weight shared by several layers through Identity nodes; analysis names the initializer
behind them, so lowering makes every reader read it directly. Checked against ONNX Runtime on the graph before
and after: the same output, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from builder.lower.graph_edit import GraphEditor


def _shared_weight_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4) / 8.0, "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Identity", ["W"], ["W_alias"], name="alias"),
             helper.make_node("Identity", ["W_alias"], ["W_alias2"], name="alias2"),
             helper.make_node("MatMul", ["r", "W_alias2"], ["y"], name="second"),
             helper.make_node("Identity", ["W"], ["W_out"], name="kept")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4]),
                               helper.make_tensor_value_info("W_out", TensorProto.FLOAT, [4, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, {"x": x})]


def test_readers_of_an_identity_chain_read_the_initializer_and_the_chain_is_dropped() -> None:
    model = _shared_weight_model()
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    before = _run(model, x)
    editor = GraphEditor(model)
    assert editor.inline_constant_aliases() == 2  # alias2 read W_alias, second read W_alias2
    assert list(editor.node("second").input) == ["r", "W"]
    names = [n.name for n in model.graph.node]
    assert "alias" not in names and "alias2" not in names
    assert "kept" in names  # its output is a graph output
    onnx.checker.check_model(model)
    after = _run(model, x)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_graph_without_aliases_is_left_as_it_is() -> None:
    model = _shared_weight_model()
    del model.graph.node[2:4]
    model.graph.node[2].input[1] = "W"
    expected = model.SerializeToString()
    assert GraphEditor(model).inline_constant_aliases() == 0
    assert model.SerializeToString() == expected
