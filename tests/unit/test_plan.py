"""Planning: placement, shared scales, conflicts, missing statistics, PEG/FWQ parameters, FLOP share, JSON."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.graph.targets import calibration_tensors
from builder.plan.artifact import ALL_CONSUMERS, load_plan
from builder.plan.flops import gemm_flops
from builder.plan.planner import plan
from builder.quant.centered import CenteredConfig, centered_range
from builder.quant.fwq import feature_scales
from builder.quant.peg import PegConfig, peg_groups
from builder.quant.static import StaticConfig
from builder.recipes.loader import load_preset
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from calib.errors import CalibrationError, ConfigError
from calib.outliers import OutlierReport, OutlierRow
from calib.range_table import RangeMethod
from calib.ranges import RangeSpec, tensor_amax
from calib.statistics import Statistics
from tests.toygraphs import bert_block_model

WEIGHT_ROLES = (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_OUT, Role.FC1, Role.FC2)


def toy_statistics(model: onnx.ModelProto, report: GraphReport, sentences: int = 24) -> Statistics:
    """Statistics of a toy graph calibrated on real VADER sentences (the toy vocabulary is BERT's)."""
    from builder.intake.minilm import tokenizer_json_path
    from calib.collect import collect
    from calib.data import vader_splits
    from calib.tokenize import encode

    texts = [s.text for s in vader_splits().calibration[:sentences]]
    inputs = {i.name for i in model.graph.input}
    feeds = [{k: v for k, v in f.items() if k in inputs}
             for f in encode(texts, tokenizer_json_path(), max_length=32, batch_size=8)]
    return collect(model, feeds, calibration_tensors(model, report)).statistics


Toy = tuple[onnx.ModelProto, GraphReport, Statistics]


@pytest.fixture(scope="module")
def toy() -> Toy:
    model = bert_block_model(layers=2, hidden=36, heads=2, ffn=72)
    report = analyze(model, name="toy_bert")
    return model, report, toy_statistics(model, report)


def _observed(statistics: Statistics, tensor: str) -> tuple[float, float]:
    minmax = statistics.get(tensor).minmax
    return minmax.minimum, minmax.maximum


def test_int8_gemm_places_qdq_on_every_weight_gemm_input(toy: Toy) -> None:
    model, report, stats = toy
    p = plan(report, load_preset("int8-gemm"), stats, flops=gemm_flops(model, report))
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
        assert len(shared.consumers) == 3 and shared.quantizer == "centered"
        lo, hi = _observed(stats, q.inputs[0])  # max range, centered: midpoint offset and half-width
        assert shared.params.offset == (lo + hi) / 2
        assert shared.params.amax == (hi - lo) / 2
    for node in p.nodes:
        assert node.reason
        expected = Precision.INT8 if Role(node.role) in WEIGHT_ROLES else Precision.FP32
        assert node.precision == expected, node


def test_int8_share_counts_gemm_flops(toy: Toy) -> None:
    model, report, table = toy
    seq, hidden, ffn, layers = 128, 36, 72, 2
    weight = layers * 2 * seq * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = layers * 2 * (2 * seq * seq * hidden)
    p = plan(report, load_preset("int8-gemm"), table, flops=gemm_flops(model, report, seq))
    assert p.int8_gemm_flop_share == pytest.approx(weight / (weight + attention))
    m3 = plan(report, load_preset("hero-m3"), table, flops=gemm_flops(model, report, seq))
    assert m3.int8_gemm_flop_share == pytest.approx(1.0)


def test_plan_json_round_trip(toy: Toy) -> None:
    model, report, table = toy
    for name in ("int8-gemm", "hero-m3", "bondarenko-peg"):
        p = plan(report, load_preset(name), table, flops=gemm_flops(model, report))
        assert load_plan(p.to_json()) == p
        assert p.to_json() == plan(report, load_preset(name), table, flops=gemm_flops(model, report)).to_json()


def test_conflicting_rules_for_a_shared_tensor(toy: Toy) -> None:
    _, report, stats = toy
    recipe = load_preset("int8-gemm").with_rules((
        Rule(select=Selector(roles=(Role.K_PROJ,)),
             set=Settings(activation=CenteredConfig(range="percentile", percentile=99.9))),
    ))
    with pytest.raises(ConfigError, match=r"conflicting rules for tensor .* one tensor has one scale"):
        plan(report, recipe, stats)


def test_missing_statistics_are_named(toy: Toy) -> None:
    _, report, stats = toy
    fc2 = report.find(Role.FC2, 1)
    assert fc2 is not None
    partial = stats.subset(k for k in stats.tensors if k != fc2.inputs[0])
    with pytest.raises(CalibrationError, match=f"lack 1 tensor.*{fc2.inputs[0]} \\(not calibrated\\)"):
        plan(report, load_preset("int8-gemm"), partial)
    no_histograms = Statistics(meta=stats.meta, tensors={
        k: type(v)(tensor=k, observers={kind: o for kind, o in v.observers.items() if kind != "histogram"})
        for k, v in stats.tensors.items()})  # kinds in meta disagree, but planning reads the observers
    with pytest.raises(CalibrationError, match=r"centered needs histogram"):
        plan(report, load_preset("int8-gemm"), no_histograms)


def test_every_range_method_comes_from_one_statistics(toy: Toy) -> None:
    _, report, stats = toy
    fc2 = report.find(Role.FC2, 0)
    assert fc2 is not None
    for config, spec in ((CenteredConfig(range="percentile", percentile=99.9),
                          RangeSpec(method=RangeMethod.PERCENTILE, percentile=99.9)),
                         (CenteredConfig(range="entropy"), RangeSpec(method=RangeMethod.ENTROPY)),
                         (CenteredConfig(range="mse"), RangeSpec(method=RangeMethod.MSE))):
        recipe = load_preset("int8-gemm").with_rules((
            Rule(select=Selector(roles=(Role.FC2,)), set=Settings(activation=config)),))
        act = next(a for a in plan(report, recipe, stats).activations if a.tensor == fc2.inputs[0])
        assert act.method == f"{spec.label}+center"
        offset, half = centered_range(tensor_amax(stats.get(fc2.inputs[0]), spec), *_observed(stats, fc2.inputs[0]))
        assert (act.params.offset, act.params.amax) == (offset, half)


def test_bondarenko_mp_reasons_name_the_rule(toy: Toy) -> None:
    _, report, stats = toy
    p = plan(report, load_preset("bondarenko-mp"), stats, flagged=(1,))
    fc2 = report.find(Role.FC2, 1)
    assert fc2 is not None
    node = p.node(fc2.node)
    assert node.precision == Precision.FP16 and "Bondarenko MP" in node.reason
    assert p.flagged_layers == (1,)
    assert fc2.inputs[0] not in {a.tensor for a in p.activations}
    with pytest.raises(ConfigError, match="outlier report"):
        plan(report, load_preset("bondarenko-mp"), stats)


def test_hero_m3_quantizes_layernorm_and_softmax_outputs(toy: Toy) -> None:
    _, report, table = toy
    p = plan(report, load_preset("hero-m3"), table)
    by_tensor = {a.tensor: a for a in p.activations}
    sm = report.find(Role.ATTN_SOFTMAX, 0)
    ln = report.find(Role.ATTN_LN, 0)
    assert sm is not None and ln is not None
    assert by_tensor[sm.outputs[0]].consumers == (ALL_CONSUMERS,)
    assert by_tensor[sm.outputs[0]].params.amax == 1.0 and by_tensor[sm.outputs[0]].method == "fixed"
    assert by_tensor[ln.outputs[0]].quantizer == "fwq" and by_tensor[ln.outputs[0]].all_consumers


def test_quantizers_outside_their_placements_are_rejected(toy: Toy) -> None:
    _, report, stats = toy
    for role, config, where in ((Role.ATTN_QK, PegConfig(), "operand"), (Role.ATTN_PV, CenteredConfig(), "operand"),
                                (Role.ATTN_LN, CenteredConfig(), "output")):
        recipe = Recipe(name="t", rules=(Rule(select=Selector(roles=(role,)),
                                              set=Settings(precision=Precision.INT8, activation=config)),))
        with pytest.raises(ConfigError, match=f"cannot quantize {where} tensors"):
            plan(report, recipe, stats)


def test_residual_add_cannot_be_int8(toy: Toy) -> None:
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


def test_static_config_checks_its_options() -> None:
    with pytest.raises(ConfigError, match="range fixed needs a positive amax"):
        StaticConfig(range="fixed")
    with pytest.raises(ConfigError, match="only used with range fixed"):
        StaticConfig(range="max", amax=2.0)


def test_feature_scales_equalize_features() -> None:
    c = np.array([0.5, 2.0, 8.0, 1.0])
    scale, amax = feature_scales(c, alpha=1.0)
    np.testing.assert_allclose(np.asarray(scale), c / 8.0, rtol=1e-6)
    assert amax == pytest.approx(8.0)
    scale_half, amax_half = feature_scales(c, alpha=0.5)
    np.testing.assert_allclose(np.asarray(scale_half), np.sqrt(c) / np.sqrt(8.0), rtol=1e-6)
    assert amax_half == pytest.approx(float(np.max(c / (np.sqrt(c) / np.sqrt(8.0)))))


def test_flagged_layers_from_an_outlier_report() -> None:
    def row(layer: int | None, role: str, ratio: float) -> OutlierRow:
        return OutlierRow(tensor=f"t{layer}{role}", layer=layer, role=role, width=4, amax=1.0,
                          percentiles=(1.0, 1.0, 1.0), max_over_p9999=ratio, outlier_dims=(), outlier_dim_amax=(),
                          median_dim_amax=1.0, range_share=0.0, top_tokens=())

    report = OutlierReport(factor=6.0, rows=(row(0, "fc2", 36.8), row(1, "ffn_residual", 11.2), row(2, "fc2", 3.0),
                                             row(3, "attn_ln", 50.0), row(None, "fc2", 99.0)))
    assert report.flagged_layers() == (0, 1)  # attn_ln is not a mixed-precision role; layer None is no layer
    assert OutlierReport.from_json(report.to_json()).flagged_layers() == (0, 1)
    with pytest.raises(ConfigError, match="unknown key 'rowz'"):
        OutlierReport.from_json(report.to_json().replace('"rows"', '"rowz"'))


def test_attention_operands_share_one_scale(toy: Toy) -> None:
    _, report, stats = toy
    p = plan(report, load_preset("hero-m3"), stats)
    by_tensor = {a.tensor: a for a in p.activations}
    for layer in (0, 1):
        qk, pv = report.find(Role.ATTN_QK, layer), report.find(Role.ATTN_PV, layer)
        assert qk is not None and pv is not None
        operands = [by_tensor[t] for t in (*qk.inputs, pv.inputs[1])]
        expected = max(max(abs(v) for v in _observed(stats, t)) for t in (*qk.inputs, pv.inputs[1]))
        assert {a.params.amax for a in operands} == {expected}
        assert {a.scale_group for a in operands} == {f"layer{layer}.attention_qkv"}
        assert by_tensor[pv.inputs[0]].params.amax == 1.0  # the softmax output keeps its fixed scale


def test_softmax_output_never_joins_the_qkv_scale(toy: Toy) -> None:
    """hero-m3 with the softmax in FP16: P is quantized as an operand of P.V, with its own range, not Q/K/V's."""
    _, report, stats = toy
    recipe = load_preset("hero-m3").with_rules((
        Rule(select=Selector(roles=(Role.ATTN_SOFTMAX,)), set=Settings(precision=Precision.FP16)),))
    p = plan(report, recipe, stats)
    by_tensor = {a.tensor: a for a in p.activations}
    for layer in (0, 1):
        pv = report.find(Role.ATTN_PV, layer)
        assert pv is not None
        probs = by_tensor[pv.inputs[0]]
        assert probs.scale_group == "" and not probs.all_consumers
        assert probs.params.amax == max(abs(v) for v in _observed(stats, pv.inputs[0])) <= 1.0
        assert by_tensor[pv.inputs[1]].scale_group == f"layer{layer}.attention_qkv"
        assert by_tensor[pv.inputs[1]].params.amax > probs.params.amax
