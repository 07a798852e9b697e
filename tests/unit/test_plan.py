"""Planning: placement, shared scales, conflicts, missing ranges, PEG/FWQ ranges, FLOP share, JSON round trip."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.graph.targets import calibration_tensors
from builder.plan.artifact import ALL_CONSUMERS, QuantPlan
from builder.plan.flops import gemm_flops
from builder.plan.planner import plan
from builder.plan.ranges import centered_range, feature_scales, peg_groups
from builder.recipes.loader import load_preset
from builder.recipes.model import Precision, RangeChoice, Recipe, Rule, Scheme, Selector, Settings
from calib.errors import CalibrationError, ConfigError
from calib.range_table import RangeMethod, RangeTable
from tests.toygraphs import bert_block_model

WEIGHT_ROLES = (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_OUT, Role.FC1, Role.FC2)


def toy_ranges(model: onnx.ModelProto, report: GraphReport, method: RangeMethod = RangeMethod.MSE,
               percentile: float | None = None, sentences: int = 24) -> RangeTable:
    """Ranges of a toy graph calibrated on real VADER sentences (the toy vocabulary is BERT's).

    Every table keeps the observed min/max, so ``max`` ranges are available next to the table's method.
    """
    from builder.intake.minilm import tokenizer_json_path
    from calib.calibrate import calibrate
    from calib.data import vader_splits
    from calib.tokenize import encode

    texts = [s.text for s in vader_splits().calibration[:sentences]]
    inputs = {i.name for i in model.graph.input}
    feeds = [{k: v for k, v in f.items() if k in inputs}
             for f in encode(texts, tokenizer_json_path(), max_length=32, batch_size=8)]
    return calibrate(model, feeds, calibration_tensors(model, report), method, percentile)


@pytest.fixture(scope="module")
def toy() -> tuple[onnx.ModelProto, GraphReport, RangeTable]:
    model = bert_block_model(layers=2, hidden=36, heads=2, ffn=72)
    report = analyze(model, name="toy_bert")
    return model, report, toy_ranges(model, report)


def test_int8_gemm_places_qdq_on_every_weight_gemm_input(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]
                                                         ) -> None:
    model, report, table = toy
    p = plan(report, load_preset("int8-gemm"), table, flops=gemm_flops(model, report))
    gemms = [a for a in report.assignments if a.role in WEIGHT_ROLES]
    assert {w.node for w in p.weights} == {a.node for a in gemms}
    assert all(w.axis == 1 for w in p.weights)
    by_tensor = {act.tensor: act for act in p.activations}
    assert set(by_tensor) == {a.inputs[0] for a in gemms}
    # Q, K and V read one LayerNorm output: one Q/DQ with one scale, shared by the three projections
    for layer in (0, 1):
        q = report.find(Role.Q_PROJ, layer)
        assert q is not None
        shared = by_tensor[q.inputs[0]]
        assert len(shared.consumers) == 3 and shared.scheme == Scheme.TENSOR
        rng = table.get(q.inputs[0])  # max range, centered: midpoint offset and half-width
        assert shared.offset == (rng.observed_min + rng.observed_max) / 2
        assert shared.amax == (rng.observed_max - rng.observed_min) / 2
    for node in p.nodes:
        assert node.reason
        expected = Precision.INT8 if Role(node.role) in WEIGHT_ROLES else Precision.FP32
        assert node.precision == expected, node


def test_int8_share_counts_gemm_flops(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]) -> None:
    model, report, table = toy
    seq, hidden, ffn, layers = 128, 36, 72, 2
    weight = layers * 2 * seq * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = layers * 2 * (2 * seq * seq * hidden)
    p = plan(report, load_preset("int8-gemm"), table, flops=gemm_flops(model, report, seq))
    assert p.int8_gemm_flop_share == pytest.approx(weight / (weight + attention))
    m3 = plan(report, load_preset("hero-m3"), table, flops=gemm_flops(model, report, seq))
    assert m3.int8_gemm_flop_share == pytest.approx(1.0)


def test_plan_json_round_trip(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]) -> None:
    model, report, table = toy
    for name in ("int8-gemm", "hero-m3", "bondarenko-peg"):
        p = plan(report, load_preset(name), table, flops=gemm_flops(model, report))
        assert QuantPlan.from_json(p.to_json()) == p
        assert p.to_json() == plan(report, load_preset(name), table, flops=gemm_flops(model, report)).to_json()


def test_conflicting_rules_for_a_shared_tensor(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]) -> None:
    _, report, table = toy
    recipe = load_preset("int8-gemm").with_rules((
        Rule(select=Selector(roles=(Role.K_PROJ,)), set=Settings(range=RangeChoice.PERCENTILE, percentile=99.9)),
    ))
    with pytest.raises(ConfigError, match=r"conflicting rules for tensor .* one tensor has one scale"):
        plan(report, recipe, table)


def test_missing_ranges_are_named(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]) -> None:
    _, report, table = toy
    fc2 = report.find(Role.FC2, 1)
    assert fc2 is not None
    partial = RangeTable(model_name="t", model_sha256="x", num_samples=1, data_source="t",
                         ranges={k: v for k, v in table.ranges.items() if k != fc2.inputs[0]})
    with pytest.raises(CalibrationError, match=f"lacks 1 range.*{fc2.inputs[0]}.*not in any table"):
        plan(report, load_preset("int8-gemm"), partial)
    only_max = toy_ranges(toy[0], report, RangeMethod.MAX, None)
    with pytest.raises(CalibrationError, match=r"lacks 2 range.*needs mse; has max"):
        plan(report, load_preset("int8-gemm"), only_max)
    wants_entropy = load_preset("int8-gemm").with_rules((
        Rule(select=Selector(roles=(Role.FC2,)), set=Settings(range=RangeChoice.ENTROPY)),))
    with pytest.raises(CalibrationError, match=r"lacks 2 range.*needs entropy; has mse"):
        plan(report, wants_entropy, table)


def test_several_tables_offer_several_methods(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]) -> None:
    model, report, table = toy
    pct = toy_ranges(model, report, RangeMethod.PERCENTILE, 99.9)
    recipe = load_preset("int8-gemm").with_rules((
        Rule(select=Selector(roles=(Role.FC2,)), set=Settings(range=RangeChoice.PERCENTILE, percentile=99.9)),))
    p = plan(report, recipe, [table, pct])
    fc2 = report.find(Role.FC2, 0)
    assert fc2 is not None
    act = next(a for a in p.activations if a.tensor == fc2.inputs[0])
    rng = pct.get(fc2.inputs[0])
    assert act.method == "percentile:99.9+center"
    assert (act.offset, act.amax) == centered_range(rng.amax, rng.observed_min, rng.observed_max)


def test_bondarenko_mp_reasons_name_the_rule(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]) -> None:
    model, report, _ = toy
    table = toy_ranges(model, report, RangeMethod.PERCENTILE, 99.995)  # its FC2 inputs take the 99.995th pct
    p = plan(report, load_preset("bondarenko-mp"), table, outliers={1})
    fc2 = report.find(Role.FC2, 1)
    assert fc2 is not None
    node = p.node(fc2.node)
    assert node.precision == Precision.FP16 and "Bondarenko MP" in node.reason
    assert p.flagged_layers == (1,)
    assert fc2.inputs[0] not in {a.tensor for a in p.activations}


def test_hero_m3_quantizes_layernorm_and_softmax_outputs(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]
                                                          ) -> None:
    _, report, table = toy
    p = plan(report, load_preset("hero-m3"), table)
    by_tensor = {a.tensor: a for a in p.activations}
    sm = report.find(Role.ATTN_SOFTMAX, 0)
    ln = report.find(Role.ATTN_LN, 0)
    assert sm is not None and ln is not None
    assert by_tensor[sm.outputs[0]].consumers == (ALL_CONSUMERS,)
    assert by_tensor[sm.outputs[0]].amax == 1.0 and by_tensor[sm.outputs[0]].method == "fixed"
    assert by_tensor[ln.outputs[0]].scheme == Scheme.FEATURE and by_tensor[ln.outputs[0]].all_consumers


def test_peg_on_attention_matmul_is_rejected(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]) -> None:
    _, report, table = toy
    recipe = Recipe(name="t", rules=(Rule(select=Selector(roles=(Role.ATTN_QK,)),
                                          set=Settings(precision=Precision.INT8, scheme=Scheme.PEG)),))
    with pytest.raises(ConfigError, match="weight GEMM consumer"):
        plan(report, recipe, table)


def test_residual_add_cannot_be_int8(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]) -> None:
    _, report, table = toy
    recipe = Recipe(name="t", rules=(Rule(select=Selector(roles=(Role.FFN_RESIDUAL,)),
                                          set=Settings(precision=Precision.INT8)),))
    with pytest.raises(ConfigError, match="cannot run in INT8"):
        plan(report, recipe, table)


def test_peg_groups_follow_the_range_sorted_permutation() -> None:
    lo = np.array([-1.0, -9.0, -0.5, -2.0, -30.0, -3.0])
    hi = np.array([1.0, 2.0, 0.5, 2.0, 40.0, 3.0])
    groups = peg_groups("x", lo, hi, 3)
    # ranges r = hi - lo = [2, 11, 1, 4, 70, 6]; ascending order: 2, 0, 3, 5, 1, 4
    assert [g.dims for g in groups] == [(0, 2), (3, 5), (1, 4)]
    assert [g.amax for g in groups] == [1.0, 3.0, 40.0]
    with pytest.raises(ConfigError, match="multiple of groups=4"):
        peg_groups("x", lo, hi, 4)


def test_feature_scales_equalize_features() -> None:
    c = np.array([0.5, 2.0, 8.0, 1.0])
    scale, amax = feature_scales(c, alpha=1.0)
    np.testing.assert_allclose(np.asarray(scale), c / 8.0, rtol=1e-6)
    assert amax == pytest.approx(8.0)
    scale_half, amax_half = feature_scales(c, alpha=0.5)
    np.testing.assert_allclose(np.asarray(scale_half), np.sqrt(c) / np.sqrt(8.0), rtol=1e-6)
    assert amax_half == pytest.approx(float(np.max(c / (np.sqrt(c) / np.sqrt(8.0)))))


def test_flagged_layers_from_an_outlier_report() -> None:
    from types import SimpleNamespace

    from builder.plan.planner import flagged_layers

    rows = [SimpleNamespace(layer=0, role="fc2", max_over_p9999=36.8),
            SimpleNamespace(layer=1, role="ffn_residual", max_over_p9999=11.2),
            SimpleNamespace(layer=2, role="fc2", max_over_p9999=3.0),
            SimpleNamespace(layer=3, role="attn_ln", max_over_p9999=50.0),  # not an MP role
            SimpleNamespace(layer=None, role="fc2", max_over_p9999=99.0)]
    assert flagged_layers(SimpleNamespace(rows=rows)) == (0, 1)
    assert flagged_layers({5, 4}) == (4, 5)
    assert flagged_layers(SimpleNamespace(flagged_layers=[2])) == (2,)
    assert flagged_layers(None) is None
    with pytest.raises(ConfigError, match="does not name flagged layers"):
        flagged_layers(["a"])


def test_attention_operands_share_one_scale(toy: tuple[onnx.ModelProto, GraphReport, RangeTable]) -> None:
    _, report, table = toy
    p = plan(report, load_preset("hero-m3"), table)
    by_tensor = {a.tensor: a for a in p.activations}
    for layer in (0, 1):
        qk, pv = report.find(Role.ATTN_QK, layer), report.find(Role.ATTN_PV, layer)
        assert qk is not None and pv is not None
        operands = [by_tensor[t] for t in (*qk.inputs, pv.inputs[1])]
        expected = max(max(abs(table.get(t).observed_min), abs(table.get(t).observed_max))
                       for t in (*qk.inputs, pv.inputs[1]))
        assert {a.amax for a in operands} == {expected}
        assert {a.scale_group for a in operands} == {f"layer{layer}.attention_qkv"}
        assert by_tensor[pv.inputs[0]].amax == 1.0  # the softmax output keeps its fixed scale
