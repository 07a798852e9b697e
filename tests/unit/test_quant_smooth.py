"""SmoothQuant-style migration (builder.quant.smooth) on the toy Llama decoders (tests/toy_llama.py).

* the fold alone (1/s into the norm weight or the up projection's columns, s into the consumers' rows; no
  quantization) leaves the float function unchanged up to float rounding: folded graph vs original graph;
* the lowered graph's GEMM input equals the quantizer's NumPy reference DQ(Q(x / s)) * s (within 1 LSB where
  the folded norm rounds x / s differently from NumPy) and s follows the SmoothQuant formula, computed here
  independently from the calibrated channel maxima and the consumers' weights;
* plans and lowers with RMSNorm fused (opset 23 RMSNormalization) and decomposed (three spellings).

The toys are fed token ids taken from real text (the Lee background corpus, bytes modulo the toy's 50-token
vocabulary), never random data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.lower.context import LoweringContext
from builder.lower.graph_edit import GraphEditor
from builder.pipeline import calibrate, plan_model, quantize
from builder.plan.artifact import QuantPlan
from builder.quant.fold import fold_divide, scale_rows
from builder.quant.registry import activation_config, activation_quantizer
from builder.quant.smooth import SmoothConfig, SmoothParams, smoothing_scales
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from builder.weights.weightset import WeightSet
from calib.errors import ConfigError
from calib.statistics import Statistics
from tests.toy_llama import NORMS, llama_block_model, toy_feeds
from tests.unit.test_lower import fake_quant, run_ort

SMOOTH_ROLES = (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.GATE_PROJ, Role.UP_PROJ, Role.FC2, Role.LM_HEAD)


def _recipe(alpha: float, roles: tuple[Role, ...] = SMOOTH_ROLES, static_out: bool = True) -> Recipe:
    rules = [Rule(select=Selector(roles=roles), set=Settings(precision=Precision.INT8,
                                                           activation=SmoothConfig(alpha=alpha)))]
    if static_out:
        rules.append(Rule(select=Selector(roles=(Role.ATTN_OUT,)), set=Settings(precision=Precision.INT8)))
    return Recipe(name="smooth-toy", rules=tuple(rules))


def _text_ids(count: int, offset: int) -> np.ndarray:
    from calib.data import lee_background_documents

    text = " ".join(lee_background_documents()[:4]).encode("utf-8")
    return np.frombuffer(text[offset:offset + count], dtype=np.uint8).astype(np.int64) % 50


def _feeds(model: onnx.ModelProto, batches: int = 3, batch: int = 2, seq: int = 12) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(batches):
        feed = toy_feeds(model, batch=batch, seq=seq)
        feed["input_ids"] = _text_ids(batch * seq, 997 * i).reshape(batch, seq)
        out.append(feed)
    return out


def _toy(norm: str, layers: int = 2) -> tuple[onnx.ModelProto, GraphReport, Statistics, list[dict[str, Any]]]:
    model = llama_block_model(layers=layers, norm=norm)
    report = analyze(model, name=f"toy-{norm}")
    feeds = _feeds(model)
    return model, report, calibrate(model, report, feeds).statistics, feeds


def _folded_float(model: onnx.ModelProto, plan: QuantPlan) -> onnx.ModelProto:
    """Every smoothing fold of ``plan`` applied in float (consumers read X / s and diag(s).W), no Q/DQ."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    ctx = LoweringContext(GraphEditor(work), plan, WeightSet(entries={}))
    ed = ctx.ed
    for edge in plan.activations:
        if edge.quantizer != "smooth":
            continue
        scale = np.asarray(edge.params.feature_scale, dtype=np.float32)
        folded = fold_divide(ctx, edge.tensor, scale, "smooth", in_place=True)
        for name in edge.consumers:
            node = ed.node(name)
            ed.replace_input(node, edge.tensor, folded.source)
            w = next(w for w in plan.weights if w.node == name)
            value, axis = ed.initializer(w.weight), w.axis
            assert value is not None
            if node.input[1] != w.weight:  # a tied LM head reads the embedding through one Transpose
                value, axis = value.T, 1 - axis
            node.input[1] = ed.add_initializer(f"{w.weight}_rows", scale_rows(value, axis, scale))
    ctx.run_after_weights()
    ed.finish()
    return ed.model


@pytest.mark.parametrize("norm", NORMS)
def test_folding_preserves_the_float_function(norm: str) -> None:
    model, report, stats, feeds = _toy(norm)
    plan = plan_model(model, report, _recipe(0.8), stats)
    folded = _folded_float(model, plan)
    kinds = {n.op_type for n in folded.graph.node} - {n.op_type for n in model.graph.node}
    assert not kinds, f"the fold added runtime ops {kinds}"
    assert len(folded.graph.node) == len(model.graph.node)
    for feed in feeds:
        expected = run_ort(model, feed)["logits"]
        got = run_ort(folded, feed)["logits"]
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * float(np.abs(expected).max()))


def test_smoothing_scales_follow_the_formula_from_statistics_and_weights() -> None:
    model, report, stats, _ = _toy("decomposed", layers=1)
    plan = plan_model(model, report, _recipe(0.6), stats)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    by_node = {a.node: a for a in report.assignments}
    edges = [a for a in plan.activations if a.quantizer == "smooth"]
    assert {by_node[e.consumers[0]].role for e in edges} == {Role.Q_PROJ, Role.GATE_PROJ, Role.FC2, Role.LM_HEAD}
    for edge in edges:
        dims = stats.tensors[edge.tensor].dims
        assert dims is not None and dims.channel_amax is not None
        c = np.maximum(dims.channel_amax, 1e-5)
        w = np.max([np.abs(inits[by_node[n].weight or ""]).max(axis=int(by_node[n].weight_axis or 0))
                    for n in edge.consumers], axis=0)
        s = (c ** 0.6 / np.maximum(w, 1e-5) ** 0.4).astype(np.float32)
        np.testing.assert_allclose(np.asarray(edge.params.feature_scale, dtype=np.float32), s, rtol=1e-6)
        assert edge.params.amax == pytest.approx(float(np.max(c / s)), rel=1e-6)
        assert edge.method == "smooth:alpha=0.6,max"


@pytest.mark.parametrize("norm", ["fused", "decomposed"])
def test_lowered_gemm_input_equals_the_numpy_reference(norm: str) -> None:
    model, report, stats, feeds = _toy(norm)
    result = quantize(model, report, _recipe(0.8), stats)
    q = result.model.model
    q_proj = report.find(Role.Q_PROJ, 0)
    assert q_proj is not None
    edge = next(a for a in result.plan.activations if a.tensor == q_proj.inputs[0])
    node = next(n for n in q.graph.node if n.name == q_proj.node)
    dq = next(n for n in q.graph.node if n.output[0] == node.input[0])
    assert dq.op_type == "DequantizeLinear"
    s = np.asarray(edge.params.feature_scale, dtype=np.float32)
    step = np.float32(edge.params.amax / 127)
    for feed in feeds:
        x = run_ort(model, feed, [q_proj.inputs[0]])[q_proj.inputs[0]]  # layer 0: nothing upstream is quantized
        read = run_ort(q, feed, [node.input[0]])[node.input[0]] * s
        expected = activation_quantizer("smooth").reference(x, edge.params)
        independent = fake_quant(x / s, step) * s
        np.testing.assert_array_equal(expected, independent)
        lsb = np.broadcast_to(step * s, x.shape)
        off = np.abs(read - expected)
        assert np.all(off <= lsb * 1.0001), "more than one LSB from the reference"
        assert np.mean(off > 1e-6 * lsb) < 0.01, "the folded norm should round x / s like NumPy almost everywhere"


@pytest.mark.parametrize("norm", NORMS)
def test_plans_and_lowers_with_every_rmsnorm_form(norm: str) -> None:
    model, report, stats, feeds = _toy(norm)
    result = quantize(model, report, _recipe(0.5), stats)
    q = result.model.model
    added = {n.op_type for n in q.graph.node} - {n.op_type for n in model.graph.node}
    assert added <= {"QuantizeLinear", "DequantizeLinear", "Constant"}, f"unexpected runtime ops {added}"
    assert sum(n.op_type == "Mul" for n in q.graph.node) == sum(n.op_type == "Mul" for n in model.graph.node)
    norm_ops = "RMSNormalization" if norm == "fused" else "ReduceMean"
    count = sum(n.op_type == norm_ops for n in q.graph.node)
    assert count == sum(n.op_type == norm_ops for n in model.graph.node), "a norm was duplicated"
    smooth = {a.tensor for a in result.plan.activations if a.quantizer == "smooth"}
    assert len(smooth) == 2 * 3 + 1  # per layer: attn_ln and ffn_ln outputs, the down-proj input; + final norm
    for feed in feeds:
        ref = run_ort(model, feed)["logits"]
        got = run_ort(q, feed)["logits"]
        cos = float(np.sum(ref * got) / np.sqrt(np.sum(ref * ref) * np.sum(got * got)))
        assert cos > 0.99


def test_up_projection_int8_scales_absorb_the_down_projection_factors() -> None:
    model, report, stats, _ = _toy("decomposed", layers=1)
    result = quantize(model, report, _recipe(0.8), stats)
    q = result.model.model
    up, fc2 = report.find(Role.UP_PROJ, 0), report.find(Role.FC2, 0)
    assert up is not None and fc2 is not None and up.weight is not None
    s_down = np.asarray(next(a for a in result.plan.activations if a.tensor == fc2.inputs[0]).params.feature_scale,
                        dtype=np.float32)
    s_ln = np.asarray(next(a for a in result.plan.activations if a.tensor == up.inputs[0]).params.feature_scale,
                      dtype=np.float32)
    node = next(n for n in q.graph.node if n.name == up.node)
    dq = next(n for n in q.graph.node if n.output[0] == node.input[1])
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    lowered = inits[dq.input[0]].astype(np.float32) * inits[dq.input[1]]
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == up.weight))
    rows = w * s_ln[:, None]
    scale = (np.abs(rows).max(axis=0).astype(np.float64) / 127).astype(np.float32)
    expected = np.clip(np.rint(rows / scale), -127, 127) * (scale / s_down)
    np.testing.assert_allclose(lowered, expected, rtol=1e-6, atol=0)


def test_other_readers_keep_the_unsmoothed_value() -> None:
    """A norm output read by a float node too: the norm is duplicated, the float reader keeps x."""
    model, report, stats, feeds = _toy("fused", layers=1)
    recipe = _recipe(0.5, roles=(Role.Q_PROJ, Role.K_PROJ))  # V stays float and reads the same norm output
    result = quantize(model, report, recipe, stats)
    q = result.model.model
    assert sum(n.op_type == "RMSNormalization" for n in q.graph.node) == 3 + 1  # attn_ln duplicated for Q/K
    v = report.find(Role.V_PROJ, 0)
    assert v is not None
    for feed in feeds:
        np.testing.assert_array_equal(run_ort(q, feed, [v.inputs[0]])[v.inputs[0]],
                                      run_ort(model, feed, [v.inputs[0]])[v.inputs[0]])


def test_config_round_trips_through_the_registry() -> None:
    config = activation_config({"quantizer": "smooth", "alpha": 0.85, "clip": 0.9}, "recipe")
    assert config == SmoothConfig(alpha=0.85, clip=0.9)
    with pytest.raises(ConfigError, match="alpha"):
        SmoothConfig(alpha=-0.1)
    with pytest.raises(ConfigError, match=r"unknown|range|entropy"):
        activation_config({"quantizer": "smooth", "range": "entropy"}, "recipe")
    s = smoothing_scales(np.array([8.0, 0.0]), np.array([2.0, 1.0]), 0.5)
    np.testing.assert_allclose(s, [2.0, np.sqrt(1e-5)], rtol=1e-6)
    assert SmoothParams(feature_scale=(1.0,), amax=1.0).amax == 1.0


@pytest.mark.parametrize("norm", ["fused", "decomposed"])
def test_a_norm_weight_shared_through_identity_is_unshared_before_folding(norm: str) -> None:
    """Exporters dedupe equal initializers behind Identity nodes: two norms reading one weight. Folding the
    attention norm's factors must leave the FFN norm reading the original weight."""
    model = llama_block_model(layers=1, norm=norm)
    report = analyze(model, name="toy")
    attn_ln, ffn_ln = report.find(Role.ATTN_LN, 0), report.find(Role.FFN_LN, 0)
    assert attn_ln is not None and ffn_ln is not None
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name for i in model.graph.initializer}

    def weight_slot(name: str) -> tuple[onnx.NodeProto, int]:
        node = nodes[name]
        return node, next(i for i, t in enumerate(node.input) if t in inits)

    (a_node, a_i), (f_node, f_i) = weight_slot(attn_ln.node), weight_slot(ffn_ln.node)
    shared = a_node.input[a_i]
    for node, index, out in ((a_node, a_i, "shared_w_a"), (f_node, f_i, "shared_w_f")):
        model.graph.node.insert(0, onnx.helper.make_node("Identity", [shared], [out], name=f"id_{out}"))
        node.input[index] = out
    feeds = _feeds(model)
    stats = calibrate(model, analyze(model, name="toy"), feeds).statistics
    report = analyze(model, name="toy")
    plan = plan_model(model, report, _recipe(0.8, roles=(Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ), static_out=False),
                      stats)
    folded = _folded_float(model, plan)
    ffn = next(n for n in folded.graph.node if n.name == ffn_ln.node)
    assert ffn.input[f_i] == "shared_w_f"  # still the Identity of the original weight
    attn = next(n for n in folded.graph.node if n.output[0].startswith(attn_ln.outputs[0]))
    assert attn.input[a_i] != "shared_w_a"
    assert "id_shared_w_a" not in {n.name for n in folded.graph.node}  # the unread Identity is gone
    for feed in feeds:
        expected = run_ort(model, feed)["logits"]
        np.testing.assert_allclose(run_ort(folded, feed)["logits"], expected, rtol=0,
                                   atol=2e-5 * float(np.abs(expected).max()))


@pytest.mark.parametrize("norm", ["fused", "decomposed"])
def test_hero_fwq_shares_the_fold_on_a_decoder(norm: str) -> None:
    """HERO FWQ (hero-m2) folds through the same rules: RMSNorm weight and the up projection, no runtime Mul."""
    from builder.recipes.loader import load_preset

    model, report, stats, feeds = _toy(norm)
    result = quantize(model, report, load_preset("hero-m2"), stats)
    q = result.model.model
    assert {a.quantizer for a in result.plan.activations} == {"fwq", "static"}
    assert sum(n.op_type == "Mul" for n in q.graph.node) == sum(n.op_type == "Mul" for n in model.graph.node)
    for feed in feeds:
        ref, got = run_ort(model, feed)["logits"], run_ort(q, feed)["logits"]
        assert float(np.sum(ref * got) / np.sqrt(np.sum(ref * ref) * np.sum(got * got))) > 0.99
