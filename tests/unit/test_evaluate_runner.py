"""ONNX Runtime side of evaluation on toy encoders: embeddings, per-layer error, INT8 GEMM share.

The toy BERT of tests/toygraphs.py gets a pooled ``sentence_embedding`` output (masked mean pool + L2 norm)
so it looks like the MiniLM export; texts are real VADER sentences tokenized with the MiniLM tokenizer.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.evaluate.flops import gemm_costs, int8_gemm_share
from builder.evaluate.layers import layer_errors, stream_tensors
from builder.evaluate.runner import OrtRunner, batches, embed, with_outputs
from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from calib.errors import GraphError
from tests.toygraphs import bert_block_model, gpt_block_model

HIDDEN, HEADS, FFN, LAYERS = 32, 2, 64, 2


def pooled_toy(seed: int = 0) -> onnx.ModelProto:
    """Toy post-LN BERT with a MiniLM-like ``sentence_embedding`` output."""
    model = bert_block_model(layers=LAYERS, hidden=HIDDEN, heads=HEADS, ffn=FFN, seed=seed)
    g = model.graph
    axes1 = numpy_helper.from_array(np.array([1], dtype=np.int64), "pool_axes1")
    axesm = numpy_helper.from_array(np.array([-1], dtype=np.int64), "pool_axes_last")
    g.initializer.extend([axes1, axesm])
    g.node.extend(
        [
            helper.make_node("Cast", ["attention_mask"], ["pool_m"], to=TensorProto.FLOAT, name="pool_cast"),
            helper.make_node("Unsqueeze", ["pool_m", "pool_axes_last"], ["pool_m3"], name="pool_unsq"),
            helper.make_node("Mul", ["last_hidden_state", "pool_m3"], ["pool_x"], name="pool_mul"),
            helper.make_node("ReduceSum", ["pool_x", "pool_axes1"], ["pool_sum"], keepdims=0, name="pool_sum"),
            helper.make_node("ReduceSum", ["pool_m3", "pool_axes1"], ["pool_cnt"], keepdims=0, name="pool_cnt"),
            helper.make_node("Div", ["pool_sum", "pool_cnt"], ["pool_mean"], name="pool_div"),
            helper.make_node("ReduceL2", ["pool_mean"], ["pool_norm"], axes=[-1], keepdims=1, name="pool_l2"),
            helper.make_node("Div", ["pool_mean", "pool_norm"], ["sentence_embedding"], name="pool_normalize"),
        ]
    )
    g.output.append(helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", HIDDEN]))
    onnx.checker.check_model(model)
    return model


def perturbed(model: onnx.ModelProto, weight: str, scale: float = 0.05, seed: int = 1) -> onnx.ModelProto:
    """A copy of ``model`` with Gaussian noise added to the initializer ``weight``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, init in enumerate(copy.graph.initializer):
        if init.name == weight:
            w = numpy_helper.to_array(init)
            noisy = w + scale * np.random.default_rng(seed).standard_normal(w.shape).astype(w.dtype)
            copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(noisy, weight))
            return copy
    raise AssertionError(f"no initializer {weight}")


@pytest.fixture(scope="module")
def toy() -> onnx.ModelProto:
    return pooled_toy()


@pytest.fixture(scope="module")
def toy_report(toy: onnx.ModelProto) -> GraphReport:
    return analyze(toy, name="toy")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from calib.data import vader_splits

    return [s.text for s in vader_splits().test[:40]]


def test_embed_restores_order_and_ignores_padding(toy: onnx.ModelProto, texts: list[str]) -> None:
    got = embed(toy, texts, batch_size=8)
    session = ort.InferenceSession(toy.SerializeToString(), providers=["CPUExecutionProvider"])
    for k in (0, 7, 19, 39):  # one sentence at a time: no padding, no reordering
        _, feed = next(batches([texts[k]], batch_size=1))
        (expected,) = session.run(["sentence_embedding"], feed)
        np.testing.assert_allclose(got[k], expected[0], rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_runner_rejects_unknown_tensor_with_suggestion(toy: onnx.ModelProto, toy_report: GraphReport) -> None:
    name = stream_tensors(toy_report)[0][2]
    with pytest.raises(GraphError, match="did you mean"):
        OrtRunner(toy, extra_outputs=[name + "x"])


def test_with_outputs_does_not_touch_the_input(toy: onnx.ModelProto, toy_report: GraphReport) -> None:
    before = toy.SerializeToString()
    exposed = with_outputs(toy, [stream_tensors(toy_report)[0][2]])
    assert len(exposed.graph.output) == len(toy.graph.output) + 1
    assert toy.SerializeToString() == before


def test_stream_tensors_follow_post_and_pre_ln_roles(toy_report: GraphReport) -> None:
    rows = stream_tensors(toy_report)
    assert [(layer, point) for layer, point, _ in rows] == [(0, "attn"), (0, "block"), (1, "attn"), (1, "block")]
    assert rows[1][2] == toy_report.find(Role.FFN_LN, 0).outputs[0]  # type: ignore[union-attr]
    gpt_report = analyze(gpt_block_model(layers=2), name="gpt")
    gpt_rows = stream_tensors(gpt_report)
    assert gpt_rows[1][2] == gpt_report.find(Role.FFN_RESIDUAL, 0).outputs[0]  # type: ignore[union-attr]


def test_layer_errors_locate_the_damaged_layer(
    toy: onnx.ModelProto, toy_report: GraphReport, texts: list[str]
) -> None:
    fc2 = toy_report.find(Role.FC2, 1)
    assert fc2 is not None and fc2.weight is not None
    damaged = perturbed(toy, fc2.weight)
    table, warnings = layer_errors(toy, damaged, toy_report, texts[:16], batch_size=8)
    assert warnings == ()
    err = {(e.layer, e.point): e.relative_error for e in table}
    # layer 0 and layer 1's attention are upstream of the noise: bit-identical
    assert err[(0, "attn")] == 0.0 and err[(0, "block")] == 0.0 and err[(1, "attn")] == 0.0
    assert err[(1, "block")] is not None and err[(1, "block")] > 1e-3
    # independent check of the number: full-batch run, valid tokens only, numpy norms
    tensor = stream_tensors(toy_report)[3][2]
    ref_sess = ort.InferenceSession(with_outputs(toy, [tensor]).SerializeToString())
    dmg_sess = ort.InferenceSession(with_outputs(damaged, [tensor]).SerializeToString())
    sq_d = sq_r = 0.0
    for _, feed in batches(texts[:16], batch_size=16):
        (r,) = ref_sess.run([tensor], feed)
        (d,) = dmg_sess.run([tensor], feed)
        valid = feed["attention_mask"].astype(bool)
        sq_d += float(np.sum((d[valid].astype(np.float64) - r[valid]) ** 2))
        sq_r += float(np.sum(r[valid].astype(np.float64) ** 2))
    assert err[(1, "block")] == pytest.approx(math.sqrt(sq_d / sq_r), rel=1e-5)


def test_layer_errors_report_missing_tensors(toy: onnx.ModelProto, toy_report: GraphReport, texts: list[str]) -> None:
    renamed = onnx.ModelProto()
    renamed.CopyFrom(toy)
    target = stream_tensors(toy_report)[0][2]
    for node in renamed.graph.node:
        node.output[:] = [o + "_r" if o == target else o for o in node.output]
        node.input[:] = [i + "_r" if i == target else i for i in node.input]
    table, warnings = layer_errors(toy, renamed, toy_report, texts[:4])
    assert table[0].relative_error is None and table[1].relative_error == 0.0
    assert len(warnings) == 1 and target in warnings[0]


def _qdq_on_gemm(model: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    """Put Q/DQ on both inputs of one weight GEMM (INT8 weight initializer + DQ, activation Q -> DQ)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    node = next(n for n in copy.graph.node if n.name == node_name)
    x, w_name = node.input[0], node.input[1]
    w = numpy_helper.to_array(next(i for i in copy.graph.initializer if i.name == w_name))
    w_scale = np.float32(np.abs(w).max() / 127)
    inits = [
        numpy_helper.from_array(np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8), "t_wq"),
        numpy_helper.from_array(np.array(w_scale, dtype=np.float32), "t_ws"),
        numpy_helper.from_array(np.array(0.05, dtype=np.float32), "t_xs"),
    ]
    copy.graph.initializer.extend(inits)
    copy.graph.node.extend(
        [
            helper.make_node("QuantizeLinear", [x, "t_xs"], ["t_xq"], name="t_q"),
            helper.make_node("DequantizeLinear", ["t_xq", "t_xs"], ["t_xd"], name="t_dqx"),
            helper.make_node("DequantizeLinear", ["t_wq", "t_ws"], ["t_wd"], name="t_dqw"),
        ]
    )
    node.input[0], node.input[1] = "t_xd", "t_wd"
    sorted_model = onnx.helper.make_model(
        onnx.helper.make_graph(
            _toposort(copy.graph), copy.graph.name, copy.graph.input, copy.graph.output, copy.graph.initializer
        ),
        opset_imports=copy.opset_import,
    )
    sorted_model.ir_version = copy.ir_version
    return sorted_model


def _toposort(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, out = list(graph.node), []
    while pending:
        node = next(n for n in pending if all(i in ready for i in n.input))
        pending.remove(node)
        out.append(node)
        ready.update(node.output)
    return out


def test_int8_gemm_share_counts_macs_of_dequantized_gemms(toy: onnx.ModelProto, toy_report: GraphReport) -> None:
    fc1 = toy_report.find(Role.FC1, 0)
    assert fc1 is not None
    model = _qdq_on_gemm(toy, fc1.node)
    batch, seq = 2, 11
    feed = {
        "input_ids": np.arange(1000, 1000 + batch * seq, dtype=np.int64).reshape(batch, seq),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
    }
    costs = gemm_costs(model, feed)
    tokens = batch * seq
    head = HIDDEN // HEADS
    per_layer = 4 * tokens * HIDDEN * HIDDEN + 2 * tokens * HIDDEN * FFN + 2 * batch * HEADS * seq * seq * head
    assert sum(c.macs for c in costs) == LAYERS * per_layer
    assert [c.node for c in costs if c.int8] == [fc1.node]
    assert int8_gemm_share(costs) == pytest.approx(tokens * HIDDEN * FFN / (LAYERS * per_layer))
    assert int8_gemm_share(gemm_costs(toy, feed)) == 0.0


def _qdq_after_ln(model: onnx.ModelProto, ln_output: str, scale: float) -> onnx.ModelProto:
    """Portable Q/DQ on one LayerNorm output: every GEMM consumer reads DQ(Q(ln)), the residual stays float."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), "t_ln_s"))
    copy.graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int8), "t_ln_z"))
    for node in copy.graph.node:
        if node.op_type == "MatMul":
            node.input[:] = ["t_ln_d" if i == ln_output else i for i in node.input]
    copy.graph.node.extend(
        [
            helper.make_node("QuantizeLinear", [ln_output, "t_ln_s", "t_ln_z"], ["t_ln_q"], name="t_ln_q"),
            helper.make_node("DequantizeLinear", ["t_ln_q", "t_ln_s", "t_ln_z"], ["t_ln_d"], name="t_ln_dq"),
        ]
    )
    graph = helper.make_graph(_toposort(copy.graph), "t", copy.graph.input, copy.graph.output, copy.graph.initializer)
    out = helper.make_model(graph, opset_imports=copy.opset_import)
    out.ir_version = copy.ir_version
    return out


@pytest.mark.slow  # importing onnxruntime-extensions loads torch and transformers (~10 s)
def test_plugin_variant_runs_through_reference_ops(
    toy: onnx.ModelProto, toy_report: GraphReport, texts: list[str]
) -> None:
    pytest.importorskip("onnxruntime_extensions")
    from builder.lower.fuse_plugins import fuse_plugins

    ln = toy_report.find(Role.FFN_LN, 0)
    assert ln is not None
    portable = _qdq_after_ln(toy, ln.outputs[0], scale=4.0 / 127)
    plugin = fuse_plugins(portable).model
    assert any(n.domain not in ("", "ai.onnx") for n in plugin.graph.node)
    got = embed(plugin, texts[:12], batch_size=4)
    expected = embed(portable, texts[:12], batch_size=4)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    table, warnings = layer_errors(portable, plugin, toy_report, texts[:4])
    assert warnings == () and all(e.relative_error is not None and e.relative_error < 1e-3 for e in table)
