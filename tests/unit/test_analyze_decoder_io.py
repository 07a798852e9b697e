"""The KV-cache interface of a decoder graph: names, layers and cache geometry, or a GraphError naming the gap."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from builder.intake.decoder_io import decoder_io
from calib.errors import GraphError

PAST, PRESENT = "past_key_values.{i}.{kind}", "present.{i}.{kind}"


def _graph(layers: int, past: str = PAST, present: str = PRESENT) -> onnx.ModelProto:
    """Inputs and outputs of a decoder (Identity bodies: only the interface matters here)."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
              for n in ("input_ids", "attention_mask", "position_ids")]
    nodes = [helper.make_node("Cast", ["input_ids"], ["logits"], name="logits", to=TensorProto.FLOAT)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    for i in range(layers):
        for kind in ("key", "value"):
            src, dst = past.format(i=i, kind=kind), present.format(i=i, kind=kind)
            inputs.append(helper.make_tensor_value_info(src, TensorProto.FLOAT, ["batch", 2, "past", 8]))
            nodes.append(helper.make_node("Identity", [src], [dst], name=dst))
            outputs.append(helper.make_tensor_value_info(dst, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("past", "present"), [("past_key_values.{i}.{kind}", "present.{i}.{kind}"),
                                               ("past.{i}.{kind}", "present.{i}.{kind}"),
                                               ("past_{kind}_{i}", "present_{kind}_{i}")])
def test_naming_conventions_are_accepted(past: str, present: str) -> None:
    io = decoder_io(_graph(3, past, present))
    assert (io.num_layers, io.num_kv_heads, io.head_dim, io.position_ids) == (3, 2, 8, "position_ids")
    assert [c.past_value for c in io.cache] == [past.format(i=i, kind="value") for i in range(3)]
    assert io.cache[2].present_key == present.format(i=2, kind="key")


def test_missing_pieces_are_named() -> None:
    model = _graph(2)
    model.graph.output.remove(next(o for o in model.graph.output if o.name == "present.1.value"))
    with pytest.raises(GraphError, match=r"layer 1 of 2 lacks its present value tensor"):
        decoder_io(model)
    with pytest.raises(GraphError, match="no past key/value inputs"):
        decoder_io(_graph(0))
    model = _graph(1)
    model.graph.input[1].name = "mask"
    with pytest.raises(GraphError, match="has no input 'attention_mask'"):
        decoder_io(model, "user.onnx")
