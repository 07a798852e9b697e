"""The registered weight quantizers rtn / optq / gpfq and the activation quantizer none, through the pipeline.

Toy BERT and GPT graphs (tests/toygraphs.py) calibrated on real VADER sentences: typed configs and their errors,
the stored layouts (MatMul [K, N] and Gemm transB [N, K]), INT4 block storage at opset 21 against a NumPy
reference graph, OPTQ from the Hessian of the GEMM input (mapped to the FWQ view), GPFQ from the partially
quantized model's inputs (a fixed point: the final weights are GPFQ of the final model's own inputs), AXE
proved by the verifier, and the checks that run before any data pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.pipeline import calibrate_weight_inputs, quantize
from builder.quant.base import WeightContext
from builder.quant.centered import CenteredConfig
from builder.quant.fwq import FwqConfig
from builder.quant.gpfq import GpfqConfig
from builder.quant.none import NoneConfig
from builder.quant.optq import OptqConfig
from builder.quant.peg import PegConfig
from builder.quant.registry import quantizer_of, weight_config
from builder.quant.rtn import RtnConfig, RtnQuantizer
from builder.quant.static import StaticConfig
from builder.recipes.loader import recipe_from_yaml, recipe_to_yaml
from builder.recipes.model import Precision, Recipe, Rule, Selector, Settings
from builder.verify.accumulator import AccumulatorSpec, verify_model
from builder.weights.inputs import input_maps
from builder.weights.staged import depths
from calib.errors import CalibrationError, ConfigError, InternalError
from calib.schema import Schema
from calib.statistics import Statistics, TensorStatistics
from calib.weights import GpfqObserver, ScaleMethod, optq
from calib.weights import OptqConfig as CalibOptqConfig
from tests.toygraphs import bert_block_model, gpt_block_model

WEIGHT_ROLES = (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.QKV, Role.ATTN_OUT, Role.FC1, Role.FC2)
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class Toy:
    model: onnx.ModelProto
    report: GraphReport
    statistics: Statistics
    feeds: list[Feed]


def _toy(model: onnx.ModelProto, name: str) -> Toy:
    from builder.intake.minilm import tokenizer_json_path
    from builder.pipeline import calibrate
    from calib.data import vader_splits
    from calib.tokenize import encode

    report = analyze(model, name=name)
    inputs = {i.name for i in model.graph.input}
    texts = [s.text for s in vader_splits().calibration[:16]]
    feeds = [{k: v for k, v in f.items() if k in inputs}
             for f in encode(texts, tokenizer_json_path(), max_length=32, batch_size=8)]
    return Toy(model, report, calibrate(model, report, feeds).statistics, feeds)


@pytest.fixture(scope="module")
def bert() -> Toy:
    return _toy(bert_block_model(layers=2, hidden=64, heads=2, ffn=128), "toy_bert")


@pytest.fixture(scope="module")
def gpt() -> Toy:
    return _toy(gpt_block_model(layers=1, hidden=64, heads=2, ffn=128, gemm_ffn=True), "toy_gpt")


def _recipe(activation: Schema, weight: Schema) -> Recipe:
    return Recipe(name="weights", rules=(Rule(select=Selector(roles=WEIGHT_ROLES, optional=True), set=Settings(
        precision=Precision.INT8, activation=activation, weight=weight)),))


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # INT4 DQ+MatMul in float
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, feeds: list[Feed], outputs: list[str]) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in outputs
                          if t not in {o.name for o in m.graph.output})
    session = _session(m)
    values = [session.run(outputs, f) for f in feeds]
    return [np.concatenate([v[i].reshape(-1, v[i].shape[-1]) for v in values]) for i in range(len(outputs))]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


# -------------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize(("quantizer", "options", "message"), [
    ("rtn", {"bits": 1}, "outside 2..8"),
    ("optq", {"bits": 9}, "outside 2..8"),
    ("gpfq", {"bits": 8, "block": 128}, "bits 2..4 with a block"),
    ("optq", {"bits": 4, "accumulator_bits": 9}, "one-element dot product"),
    ("gpfq", {"tile": 64}, "without accumulator_bits"),
    ("optq", {"bits": 4, "block": 64, "accumulator_bits": 16, "tile": 48}, "divides the block"),
    ("optq", {"percdamp": -1.0}, "percdamp"),
    ("rtn", {"scale": "minmax"}, "max"),
    ("rtn", {"tile": 64}, "tile"),
])
def test_bad_weight_configs_are_config_errors(quantizer: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        weight_config({"quantizer": quantizer, **options}, "test")


def test_quantizers_are_registered_and_recipes_round_trip() -> None:
    for config in (RtnConfig(bits=4, block=32, scale="mse"), OptqConfig(bits=4, act_order=True, percdamp=0.05),
                   GpfqConfig(bits=3, accumulator_bits=16, tile=32, soft=False)):
        recipe = _recipe(NoneConfig(), config)
        assert recipe_from_yaml(recipe_to_yaml(recipe)) == recipe
    assert quantizer_of(NoneConfig()).name == "none"
    assert OptqConfig(bits=4, block=32, act_order=True).calib().static_block_scales  # act-order fixes scales


def test_rtn_per_channel_equals_an_independent_reference() -> None:
    w = np.random.default_rng(3).standard_normal((48, 20)).astype(np.float32)
    w[:, 5] = 0.0
    for bits in (8, 4):
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(w).max(axis=0).astype(np.float64)
        scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        codes = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
        for stored, axis in ((w, 1), (w.T, 0)):
            got = RtnQuantizer().quantize(stored, axis, RtnConfig(bits=bits), WeightContext(node="g"))
            np.testing.assert_array_equal(got.values, codes if axis == 1 else codes.T)
            np.testing.assert_array_equal(got.scales, scale)


# ---------------------------------------------------------------------------------- storage and lowering

def _dequantized_reference(toy: Toy, result: Any) -> onnx.ModelProto:
    """The FP32 model with every planned weight replaced by its dequantized WeightSet entry (float)."""
    ref = onnx.ModelProto()
    ref.CopyFrom(toy.model)
    by_weight = {w.weight: result.weights.get(w.node).dequantize() for w in result.plan.weights}
    for init in ref.graph.initializer:
        if init.name in by_weight:
            init.CopyFrom(numpy_helper.from_array(by_weight[init.name], init.name))
    return ref


@pytest.mark.parametrize("toy_name", ["bert", "gpt"])
def test_w4a16_int4_blocks_compute_the_dequantized_weights(toy_name: str, request: pytest.FixtureRequest) -> None:
    toy: Toy = request.getfixturevalue(toy_name)
    result = quantize(toy.model, toy.report, _recipe(NoneConfig(), RtnConfig(bits=4, block=32)), toy.statistics)
    model = result.model.model
    assert next(o.version for o in model.opset_import if o.domain == "") == 21
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)  # weight-only: no activation Q/DQ
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    inits = {i.name: i for i in model.graph.initializer}
    assert len(dqs) == len(result.plan.weights) > 0
    for dq in dqs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4 and attrs["block_size"] == 32
    out = toy.model.graph.output[0].name
    got, = _run(model, toy.feeds[:1], [out])
    want, = _run(_dequantized_reference(toy, result), toy.feeds[:1], [out])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))


def test_int4_weight_dq_check_rejects_a_minus_eight_code_and_a_wrong_block() -> None:
    import ml_dtypes

    from builder.lower.graph_edit import GraphEditor
    from builder.quant.weight_common import check_block_weight_dq

    def model(codes: np.ndarray, scale_shape: tuple[int, ...]) -> tuple[GraphEditor, onnx.NodeProto]:
        node = onnx.helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=0, block_size=4)
        graph = onnx.helper.make_graph([node], "g", [], [onnx.helper.make_empty_tensor_value_info("y")], initializer=[
            numpy_helper.from_array(codes.astype(ml_dtypes.int4), "w"),
            numpy_helper.from_array(np.ones(scale_shape, np.float32), "s")])
        return GraphEditor(onnx.helper.make_model(graph)), node

    check_block_weight_dq(*model(np.full((8, 3), 7, np.int8), (2, 3)))
    with pytest.raises(InternalError, match=r"\[-7, 7\]"):
        check_block_weight_dq(*model(np.full((8, 3), -8, np.int8), (2, 3)))
    with pytest.raises(InternalError, match="does not tile"):
        check_block_weight_dq(*model(np.zeros((8, 3), np.int8), (4, 3)))


def test_required_opset_is_21_only_for_block_weights(bert: Toy) -> None:
    from builder.lower.opset import required_opset
    from builder.pipeline import plan_model

    for weight, opset in ((RtnConfig(bits=4), 19), (OptqConfig(bits=4, block=32), 21)):
        plan = plan_model(bert.model, bert.report, _recipe(StaticConfig(), weight), bert.statistics)
        assert required_opset(plan) == opset


# ------------------------------------------------------------------------------------------------- OPTQ

def _gemm_rows(toy: Toy, tensor: str) -> np.ndarray:
    """The non-padding rows of ``tensor`` over the toy's calibration feeds (independent of the collector)."""
    rows = []
    for feed in toy.feeds:
        value, = _run(toy.model, [feed], [tensor])
        mask = feed.get("attention_mask")
        rows.append(value if mask is None else value[mask.reshape(-1).astype(bool)])
    return np.concatenate(rows).astype(np.float64)


def test_optq_reads_the_input_hessian_collected_in_a_second_pass(bert: Toy) -> None:
    recipe = _recipe(StaticConfig(), OptqConfig(bits=4))
    with pytest.raises(CalibrationError, match="calibrate_weight_inputs"):
        quantize(bert.model, bert.report, recipe, bert.statistics)  # no feeds: the Hessians are missing
    result = quantize(bert.model, bert.report, recipe, bert.statistics, feeds=bert.feeds)
    edge = next(w for w in result.plan.weights if w.node == bert.report.by_role(Role.FC1)[0].node)
    x = _gemm_rows(bert, edge.input)
    independent = 2.0 / len(x) * (x.T @ x)
    joined = calibrate_weight_inputs(bert.model, result.plan, bert.statistics, bert.feeds)
    hessian = joined.get(edge.input).get("hessian").matrix()
    np.testing.assert_allclose(hessian, independent, rtol=1e-12, atol=1e-12 * float(np.abs(independent).max()))
    w = _weights(bert.model)[edge.weight]
    expected = optq(w, hessian, CalibOptqConfig(bits=4, act_order=True, scale_method=ScaleMethod.MSE))
    np.testing.assert_array_equal(result.weights.get(edge.node).values, expected.values)
    np.testing.assert_array_equal(result.weights.get(edge.node).scales, expected.scales)


def test_optq_maps_the_hessian_to_the_fwq_view(bert: Toy) -> None:
    result = quantize(bert.model, bert.report, _recipe(FwqConfig(alpha=1.0), OptqConfig(bits=4)), bert.statistics,
                      feeds=bert.feeds)
    edge = next(w for w in result.plan.weights if w.node == bert.report.by_role(Role.Q_PROJ)[0].node)
    act = next(a for a in result.plan.activations if a.tensor == edge.input)
    s = np.asarray(act.params.feature_scale, dtype=np.float32)
    joined = calibrate_weight_inputs(bert.model, result.plan, bert.statistics, bert.feeds)
    h = joined.get(edge.input).get("hessian").matrix()
    view = (_weights(bert.model)[edge.weight] * s[:, None]).astype(np.float32)  # diag(S) W
    expected = optq(view, h / np.outer(s.astype(np.float64), s.astype(np.float64)),
                    CalibOptqConfig(bits=4, act_order=True, scale_method=ScaleMethod.MSE))
    np.testing.assert_array_equal(result.weights.get(f"{edge.node}#fwq").values, expected.values)


def test_input_maps_read_row_scalings_and_selections(bert: Toy) -> None:
    from builder.pipeline import plan_model

    for activation, kind in ((FwqConfig(alpha=0.5), "scale"), (PegConfig(groups=4), "select"),
                             (StaticConfig(), "identity")):
        plan = plan_model(bert.model, bert.report, _recipe(activation, RtnConfig()), bert.statistics)
        w = plan.weights[0]
        edge = next(a for a in plan.activations if a.tensor == w.input)
        maps = input_maps(edge, (64, 64), w.axis, w.node)
        assert {m.kind for m in maps.values()} == {kind}
        if kind == "select":  # the groups partition the inputs
            assert sorted(np.concatenate([m.index for m in maps.values() if m.index is not None])) == list(range(64))


# ------------------------------------------------------------------------------------------------- GPFQ

def test_gemm_depths_follow_the_blocks(bert: Toy) -> None:
    nodes = {a.node: (a.role, a.layer) for a in bert.report.assignments if a.role in WEIGHT_ROLES}
    stage = depths(bert.model, set(nodes))
    order = {Role.Q_PROJ: 0, Role.K_PROJ: 0, Role.V_PROJ: 0, Role.ATTN_OUT: 1, Role.FC1: 2, Role.FC2: 3}
    assert stage == {n: order[role] + 4 * int(layer or 0) for n, (role, layer) in nodes.items()}


@pytest.mark.parametrize("activation", [StaticConfig(), CenteredConfig()])
def test_gpfq_weights_are_gpfq_of_the_final_models_own_inputs(bert: Toy, activation: Schema) -> None:
    """X~ of a GEMM depends only on the GEMMs above it, so the staged result is a fixed point: every weight equals
    GPFQ run on the inputs that the *final* quantized model computes for it, before the GEMM's own input
    quantizer (a centered input: plus the offset folded into its bias), paired with the FP32 model's."""
    result = quantize(bert.model, bert.report, _recipe(activation, GpfqConfig(bits=4)), bert.statistics,
                      feeds=bert.feeds)
    offsets = {a.tensor: float(getattr(a.params, "offset", 0.0)) for a in result.plan.activations}
    lowered = result.model.model
    weights = _weights(bert.model)
    for w in result.plan.weights:
        node = next(n for n in lowered.graph.node if n.name == w.node)
        xq_name = node.input[[*next(n for n in bert.model.graph.node if n.name == w.node).input].index(w.input)]
        producers = {out: n for n in lowered.graph.node for out in n.output}
        assert producers[xq_name].op_type == "DequantizeLinear"  # the GEMM's own input quantizer
        quantize_node = producers[producers[xq_name].input[0]]
        assert quantize_node.op_type == "QuantizeLinear"
        xq_name = quantize_node.input[0]
        pairs = GpfqObserver(weights[w.weight].shape[0])
        for feed in bert.feeds:
            mask = feed["attention_mask"].astype(bool)
            xq, = _run(lowered, [feed], [xq_name])
            xf, = _run(bert.model, [feed], [w.input])
            xq = (xq + np.float32(offsets[w.input])).astype(np.float32)
            pairs.update(np.ascontiguousarray(xq[mask.reshape(-1)]), np.ascontiguousarray(xf[mask.reshape(-1)]))
        stats = TensorStatistics(tensor=w.input, observers={"gpfq_pairs": pairs})
        expected = quantizer_of(w.config).quantize(  # type: ignore[union-attr]
            weights[w.weight], w.axis, w.config, WeightContext(node=w.node, input_statistics=stats))
        np.testing.assert_array_equal(result.weights.get(w.node).values, expected.values, err_msg=w.node)


# -------------------------------------------------------------------------------------------------- AXE

@pytest.mark.parametrize("weight", [OptqConfig(bits=4, accumulator_bits=14, tile=32),
                                    GpfqConfig(bits=4, accumulator_bits=14, tile=32)])
def test_axe_weights_are_proved_where_plain_ones_can_overflow(bert: Toy, weight: Schema) -> None:
    spec = AccumulatorSpec(accumulator_bits=14, tile=32)
    plain = quantize(bert.model, bert.report, _recipe(StaticConfig(), RtnConfig(bits=4)), bert.statistics)
    assert not verify_model(plain.model.model, spec).proved
    axe = quantize(bert.model, bert.report, _recipe(StaticConfig(), weight), bert.statistics, feeds=bert.feeds)
    report = verify_model(axe.model.model, spec)
    assert report.proved and len(report.gemms) == len(axe.plan.weights)


# ------------------------------------------------------------------------------------------- preflight

@pytest.mark.parametrize(("activation", "weight", "message"), [
    (StaticConfig(), RtnConfig(bits=4, block=48), "does not divide K=64"),
    (StaticConfig(), OptqConfig(bits=4, accumulator_bits=16, tile=256), "larger than K=64"),
    (PegConfig(groups=4), GpfqConfig(bits=4), "splits it"),
    (NoneConfig(), OptqConfig(bits=4, accumulator_bits=16), "not quantized"),
])
def test_configs_that_do_not_fit_the_gemms_fail_before_any_data_pass(bert: Toy, activation: Schema, weight: Schema,
                                                                    message: str) -> None:
    feeds: Mapping[str, Any] = {}
    with pytest.raises(ConfigError, match=message):
        quantize(bert.model, bert.report, _recipe(activation, weight), bert.statistics, feeds=[feeds])
