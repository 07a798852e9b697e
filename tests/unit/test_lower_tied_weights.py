"""Shared and tied weights: an LM head that reads the embedding through a Transpose (or Gemm transB=1) is
quantized once in the embedding's layout, the embedding Gather keeps the float table, and the lowered logits
equal an independent NumPy computation; a path the weight stage cannot keep exact stays float with a reason.

The toy decoders have random weights and a 50-token vocabulary: structure tests, fed the toy's own ids.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builder.graph.analyze import analyze
from builder.graph.report import Role
from builder.pipeline import calibrate, quantize
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from tests.toy_llama import llama_block_model, toy_feeds
from tests.unit.test_lower import fake_quant, run_ort

ALL_LINEAR = Recipe(name="all-linear", rules=(Rule(select=Selector(roles=(
    Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_OUT, Role.GATE_PROJ, Role.UP_PROJ, Role.FC2, Role.LM_HEAD)),
    set=Settings(precision=Precision.INT8)),))


def _feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    return [toy_feeds(model, batch=2, seq=5 + i) for i in range(3)]


@pytest.mark.parametrize("lm_head", ["transpose", "gemm", "untied"])
def test_lm_head_weight_is_quantized_once_and_the_embedding_stays_float(lm_head: str) -> None:
    model = llama_block_model(layers=1, lm_head=lm_head)
    report = analyze(model, name="toy")
    feeds = _feeds(model)
    stats = calibrate(model, report, feeds).statistics
    result = quantize(model, report, ALL_LINEAR, stats)
    head = report.find(Role.LM_HEAD, None)
    assert head is not None and head.weight is not None and head.weight_axis is not None
    edge = next(w for w in result.plan.weights if w.node == head.node)
    assert edge.path == head.weight_path and result.plan.node(head.node).precision == Precision.INT8
    q = result.model.model
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w = original[head.weight]
    axis = head.weight_axis
    scale = (np.max(np.abs(w), axis=1 - axis).astype(np.float64) / 127).astype(np.float32)
    shape = (-1, 1) if axis == 0 else (1, -1)
    w_dq = (np.clip(np.rint(w / scale.reshape(shape)), -127, 127) * scale.reshape(shape)).astype(np.float64)
    if lm_head != "untied":  # the embedding Gather still reads the float table
        gather = next(n for n in q.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
        assert gather.input[0] == head.weight
    node = next(n for n in q.graph.node if n.name == head.node)
    feed = feeds[0]
    out = run_ort(q, feed, [head.inputs[0], node.input[0], node.output[0]])
    x = out[head.inputs[0]]
    act = next(a for a in result.plan.activations if a.tensor == head.inputs[0])
    x_hat = fake_quant(x, np.float32(act.params.amax / 127)).astype(np.float64)
    np.testing.assert_array_equal(out[node.input[0]], x_hat.astype(np.float32))
    gemm_w = w_dq.T if lm_head in ("transpose", "untied") and axis == 0 else w_dq
    expected = x_hat.reshape(-1, x.shape[-1]) @ (gemm_w if lm_head == "untied" else w_dq.T)
    got = out[node.output[0]].reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=1e-4 * (1 + np.abs(expected).max()), rtol=0)


def test_a_weight_path_the_weight_stage_cannot_keep_exact_stays_float_with_a_reason() -> None:
    model = llama_block_model(layers=1, lm_head="transpose")
    transpose = next(n for n in model.graph.node if n.op_type == "Transpose" and n.input[0].startswith("embed"))
    cast = helper.make_node("Cast", [transpose.output[0]], ["embedding_cast"], name="cast_head", to=1)
    head = next(n for n in model.graph.node if n.op_type == "MatMul" and transpose.output[0] in n.input)
    head.input[1] = "embedding_cast"
    model.graph.node.insert(list(model.graph.node).index(head), cast)
    report = analyze(model, name="toy")
    lm = report.find(Role.LM_HEAD, None)
    if lm is None or not lm.weight_path:
        pytest.skip("the analysis does not see this weight path as a float weight path")
    stats = calibrate(model, report, _feeds(model)).statistics
    result = quantize(model, report, ALL_LINEAR, stats)
    decision = result.plan.node(lm.node)
    assert decision.precision == Precision.FP32 and "INT8 refused" in decision.reason and "Cast" in decision.reason
    assert lm.node not in {w.node for w in result.plan.weights}
