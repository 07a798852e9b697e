"""Lowering: centered INT8 inputs of weight GEMMs (Sub before QuantizeLinear, offset folded into the bias).

Each centered GEMM's output (after its bias) is compared with an independent NumPy computation
``(fake_quant(x - c) + c) @ W_int8_dequantized + b`` on real sentences, for MatMul + Add, fused QKV,
Gemm(transB=1) with a C input, and a MatMul without any bias (the pass adds one).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.graph.targets import calibration_tensors
from builder.plan.planner import plan
from builder.quant.centered import centered_range
from builder.recipes.loader import load_preset, recipe_from_yaml
from calib.collect import collect
from calib.errors import ConfigError
from tests.toygraphs import bert_block_model, gpt_block_model, mlp_model
from tests.unit.test_lower import fake_quant, lower_plan, real_feeds, run_ort
from tests.unit.test_plan import toy_statistics

CENTERED = "name: centered\nrules:\n  - select: {roles: [qkv, q_proj, k_proj, v_proj, attn_out, fc1, fc2, gemm]}\n" \
           "    set: {precision: int8, activation: {quantizer: centered}}\n"


def _weight_dq(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The dequantized INT8 weight a lowered GEMM reads, computed in NumPy (float64)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.output[0] == node.input[1])
    q, scale = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]].astype(np.float64)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    return q * (scale[None, :] if axis == 1 else scale[:, None])


def _check_centered_gemms(model: onnx.ModelProto, report: GraphReport, feeds: dict[str, np.ndarray]) -> int:
    """Compare every centered GEMM's biased output with NumPy; returns how many GEMMs were checked."""
    stats = toy_statistics(model, report, sentences=16)
    q = lower_plan(model, plan(report, recipe_from_yaml(CENTERED), stats))
    original = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    checked = 0
    for act in q.plan.activations:
        lo, hi = stats.get(act.tensor).minmax.minimum, stats.get(act.tensor).minmax.maximum
        assert (act.params.offset, act.params.amax) == centered_range(max(abs(lo), abs(hi)), lo, hi)
        for name in act.consumers:
            node = next(n for n in q.model.graph.node if n.name == name)
            fp_node = next(n for n in model.graph.node if n.name == name)
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            if node.op_type == "Gemm":
                bias, out = original[fp_node.input[2]], fp_node.output[0]
            else:
                add = next((n for n in model.graph.node if n.op_type == "Add" and fp_node.output[0] in n.input), None)
                bias = np.zeros(1) if add is None else next(original[t] for t in add.input if t in original)
                out = fp_node.output[0] if add is None else add.output[0]
            x_name = fp_node.input[0]
            values = run_ort(q.model, feeds, [x_name, out])
            x = values[x_name]
            c = np.float32(act.params.offset)
            x_hat = fake_quant(x - c, np.float32(act.params.amax / 127)).astype(np.float64) + float(c)
            w = _weight_dq(q.model, node)
            expected = x_hat @ (w.T if trans_b else w) + bias
            got = values[out].astype(np.float64)
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, atol=1e-5 * (1 + np.max(np.abs(expected))), rtol=0)
            checked += 1
    return checked


def test_centered_range_intersects_the_clip_with_the_observed_range() -> None:
    assert centered_range(5.0, -0.17, 24.0) == pytest.approx(((5.0 - 0.17) / 2, (5.0 + 0.17) / 2))
    assert centered_range(3.0, -3.0, 3.0) == (0.0, 3.0)
    assert centered_range(28.5, -6.5, 28.5) == pytest.approx((11.0, 17.5))  # 1.6x finer than symmetric
    assert centered_range(1.0, 2.0, 2.0) == (0.0, 0.0)  # constant: no range to center (lowered symmetric)


def test_centered_bert_gemms_match_numpy() -> None:
    model = bert_block_model(layers=2, hidden=36, heads=2, ffn=72)
    report = analyze(model, name="toy_bert")
    assert _check_centered_gemms(model, report, real_feeds()) == 12


def test_centered_fused_qkv_and_gemm_ffn_match_numpy() -> None:
    model = gpt_block_model(layers=1, hidden=32, heads=2, ffn=64, fused_qkv=True, gemm_ffn=True)
    report = analyze(model, name="toy_gpt")
    assert {a.role for a in report.assignments} >= {Role.QKV, Role.FC1, Role.FC2}
    feeds = {"input_ids": real_feeds()["input_ids"]}
    assert _check_centered_gemms(model, report, feeds) == 4


def test_gemm_without_bias_gets_one() -> None:
    model = mlp_model(hidden=16)
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    for add in adds:  # drop the biases: MatMul -> (Add removed) -> reader
        source = next(t for t in add.input if t not in {i.name for i in model.graph.initializer})
        for n in model.graph.node:
            for i, t in enumerate(n.input):
                if t == add.output[0]:
                    n.input[i] = source
        model.graph.node.remove(add)
    report = analyze(model, name="toy_mlp")
    x = np.stack([np.linspace(-1.0, 3.0, 16, dtype=np.float32) * (1 + 0.1 * i) for i in range(4)])
    stats = collect(model, [{"x": x}], calibration_tensors(model, report)).statistics
    q = lower_plan(model, plan(report, recipe_from_yaml(CENTERED), stats))
    added = [n for n in q.model.graph.node if n.name.endswith("_CenterBias")]
    assert len(added) == 2
    w = _weight_dq(q.model, next(n for n in q.model.graph.node if n.op_type == "MatMul"))
    act = next(a for a in q.plan.activations if a.tensor == "x")
    first = next(n for n in model.graph.node if n.op_type == "MatMul")
    got = run_ort(q.model, {"x": x}, [first.output[0]])[first.output[0]]
    c = np.float32(act.params.offset)
    expected = (fake_quant(x - c, np.float32(act.params.amax / 127)).astype(np.float64) + float(c)) @ w
    np.testing.assert_allclose(got, expected, atol=1e-5 * (1 + np.max(np.abs(expected))), rtol=0)


def test_center_is_refused_where_nothing_can_absorb_the_offset() -> None:
    model = bert_block_model(layers=1, hidden=36, heads=2, ffn=72)
    report = analyze(model, name="toy_bert")
    stats = toy_statistics(model, report, sentences=8)
    on_attention = ("name: c\nrules:\n  - select: {roles: [attn_qk]}\n"
                    "    set: {precision: int8, activation: {quantizer: centered}}\n")
    with pytest.raises(ConfigError, match=r"quantizer 'centered' cannot quantize operand tensors.*weight_input"):
        plan(report, recipe_from_yaml(on_attention), stats)
    with pytest.raises(ConfigError, match="range max, percentile, entropy or mse, not fixed"):
        recipe_from_yaml("name: c\nrules:\n  - set: {activation: {quantizer: centered, range: fixed}}\n")
    mixed = load_preset("int8-gemm").with_rules(recipe_from_yaml(
        "name: m\nrules:\n  - select: {roles: [k_proj]}\n    set: {activation: {quantizer: static}}\n").rules)
    with pytest.raises(ConfigError, match="conflicting rules for tensor"):
        plan(report, mixed, stats)
