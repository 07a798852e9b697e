"""Lowering: Q/DQ insertion, INT8 weights, FWQ folding, PEG rewrite, Cast fallback, FP16 conversion.

Every lowered toy graph passes the ONNX checker (run by ``lower`` after each pass), runs in ONNX Runtime
and is compared with independent NumPy computations or with ``onnx.reference``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.lower.pipeline import QuantizedModel, lower
from builder.plan.artifact import QuantPlan
from builder.plan.planner import plan
from builder.recipes.loader import load_preset
from builder.recipes.model import Recipe
from builder.weights.stage import quantize_weights
from calib.errors import BuildError
from calib.range_table import RangeMethod
from calib.ranges import RangeSpec, tensor_amax
from calib.statistics import Statistics
from tests.toygraphs import bert_block_model
from tests.unit.test_plan import toy_statistics


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
            ) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in outputs or []:
        if name not in {o.name for o in m.graph.output}:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def real_feeds(n: int = 4, max_length: int = 24) -> dict[str, np.ndarray]:
    from builder.intake.minilm import tokenizer_json_path
    from calib.data import vader_splits
    from calib.tokenize import encode

    texts = [s.text for s in vader_splits().test[:n]]
    return next(iter(encode(texts, tokenizer_json_path(), max_length=max_length, batch_size=n)))


def fake_quant(x: np.ndarray, scale: np.ndarray | np.float32) -> np.ndarray:
    """Independent symmetric INT8 fake quantization (round half to even, clamp [-128, 127])."""
    return (np.clip(np.rint(x.astype(np.float32) / scale), -128, 127) * scale).astype(np.float32)


Toy = tuple[onnx.ModelProto, GraphReport, Statistics]


@pytest.fixture(scope="module")
def toy() -> Toy:
    model = bert_block_model(layers=2, hidden=36, heads=2, ffn=72)
    report = analyze(model, name="toy_bert")
    return model, report, toy_statistics(model, report)


def lower_plan(model: onnx.ModelProto, p: QuantPlan, variant: str = "portable") -> QuantizedModel:
    """The weight stage, then lowering (what builder.pipeline.quantize_planned composes)."""
    return lower(model, p, quantize_weights(model, p), variant)


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    return real_feeds()


def lowered(toy: Toy, recipe: str | Recipe, **kw: Any) -> QuantizedModel:
    model, report, stats = toy
    r = load_preset(recipe) if isinstance(recipe, str) else recipe
    return lower_plan(model, plan(report, r, stats, **kw))


def ops(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def test_int8_gemm_structure_and_weights(toy: Toy) -> None:
    q = lowered(toy, "int8-gemm")
    model, report, _ = toy
    gemms = [a for a in report.assignments if a.weight is not None]
    # one Q/DQ per distinct GEMM input (Q/K/V share theirs) and one DQ per INT8 weight
    assert len(ops(q.model, "QuantizeLinear")) == len({a.inputs[0] for a in gemms})
    weight_dq = [n for n in ops(q.model, "DequantizeLinear") if n.input[0].endswith("_int8")]
    assert len(weight_dq) == len(gemms)
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for a in gemms:
        dq = next(n for n in weight_dq if n.input[0] == f"{a.weight}_int8")
        w = original[a.weight]
        scale = (np.max(np.abs(w), axis=0).astype(np.float64) / 127).astype(np.float32)
        expected = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        np.testing.assert_array_equal(init(q.model, dq.input[0]), expected)
        np.testing.assert_array_equal(init(q.model, dq.input[1]), scale)
        assert next(x.i for x in dq.attribute if x.name == "axis") == 1
    assert q.precision and set(q.precision.values()) == {"int8"}


def test_activation_qdq_is_bit_exact_fake_quant(toy: Toy, feeds: dict[str, np.ndarray]) -> None:
    q = lowered(toy, "int8-gemm")
    _, report, stats = toy
    fc2 = report.find(Role.FC2, 1)
    assert fc2 is not None
    x = fc2.inputs[0]
    node = next(n for n in q.model.graph.node if n.name == fc2.node)
    out = run_ort(q.model, feeds, [x, node.input[0]])
    amax = tensor_amax(stats.get(x), RangeSpec(method=RangeMethod.MSE))  # int8-gemm: FC2 input at its MSE range,
    minmax = stats.get(x).minmax  # centered on the clipped range
    lo, hi = max(minmax.minimum, -amax), min(minmax.maximum, amax)
    scale = np.float32((hi - lo) / 2 / 127)  # range in float64, scale in float32
    centered = out[x] - np.float32((lo + hi) / 2)
    np.testing.assert_array_equal(out[node.input[0]], fake_quant(centered, scale))


def test_lowered_model_agrees_with_onnx_reference(toy: Toy, feeds: dict[str, np.ndarray]) -> None:
    from onnx.reference import ReferenceEvaluator

    for recipe in ("int8-gemm", "hero-m3", "bondarenko-peg"):
        q = lowered(toy, recipe)
        quantized = [n.output[0] for n in ops(q.model, "QuantizeLinear")]
        ort_out = run_ort(q.model, feeds, quantized)
        ref = ReferenceEvaluator(q.model)
        ref_out = dict(zip(quantized, ref.run(quantized, feeds), strict=True))
        for name in quantized:  # INT8 tensors agree within one step on >= 99.9% of elements
            diff = np.abs(ort_out[name].astype(np.int32) - ref_out[name].astype(np.int32))
            assert np.mean(diff <= 1) >= 0.999, (recipe, name)
        final = q.model.graph.output[0].name
        (ref_final,) = ref.run([final], feeds)
        np.testing.assert_allclose(ort_out[final], ref_final, atol=0.05, rtol=0)


def test_fwq_folding_preserves_the_layernorm_output(toy: Toy, feeds: dict[str, np.ndarray]) -> None:
    q = lowered(toy, "hero-m2")
    model, report, _ = toy
    ln = report.find(Role.ATTN_LN, 0)
    fc1 = report.find(Role.FC1, 0)
    assert ln is not None and fc1 is not None and fc1.weight is not None
    act = next(a for a in q.plan.activations if a.tensor == ln.outputs[0])
    s = np.asarray(act.params.feature_scale, dtype=np.float32)
    copy = next(n for n in q.model.graph.node if n.name == f"{ln.node}_fwq")
    out = run_ort(q.model, feeds, [copy.output[0], ln.outputs[0]])
    np.testing.assert_allclose(out[copy.output[0]] * s, out[ln.outputs[0]], rtol=1e-4, atol=1e-5)
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == fc1.weight))
    folded = init(q.model, f"{fc1.weight}_fwq_int8").astype(np.float32) * init(q.model, f"{fc1.weight}_fwq_scale")
    np.testing.assert_allclose(folded, w * s[:, None], atol=float(np.max(np.abs(w * s[:, None]))) / 127 / 2 + 1e-7)


def test_hero_m3_int8_layernorm_feeds_the_residual(toy: Toy, feeds: dict[str, np.ndarray]) -> None:
    q = lowered(toy, "hero-m3")
    _, report, _ = toy
    sm = report.find(Role.ATTN_SOFTMAX, 0)
    ln = report.find(Role.FFN_LN, 1)
    assert sm is not None and ln is not None
    act = next(a for a in q.plan.activations if a.tensor == ln.outputs[0])
    assert act.all_consumers
    restore = next(n for n in q.model.graph.node if n.output[0] == ln.outputs[0])
    assert restore.op_type == "Mul"  # graph output = dequantized INT8 x feature scales
    dq = next(n for n in q.model.graph.node if n.output[0] == restore.input[0])
    assert dq.op_type == "DequantizeLinear"
    out = run_ort(q.model, feeds, [sm.outputs[0]])
    probs = out[sm.outputs[0]]
    np.testing.assert_array_equal(probs, fake_quant(probs, np.float32(1.0 / 127)))


def test_peg_rewrite_matches_fake_quant_peg(toy: Toy, feeds: dict[str, np.ndarray]) -> None:
    q = lowered(toy, "bondarenko-peg")
    model, report, _ = toy
    fc1 = report.find(Role.FC1, 1)
    assert fc1 is not None and fc1.weight is not None
    act = next(a for a in q.plan.activations if a.tensor == fc1.inputs[0])
    groups = act.params.groups
    assert len(groups) == 6 and sorted(d for g in groups for d in g.dims) == list(range(36))
    out = run_ort(q.model, feeds, [fc1.inputs[0], fc1.outputs[0]])
    x = out[fc1.inputs[0]]
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == fc1.weight))
    expected = np.zeros((*x.shape[:-1], w.shape[1]), dtype=np.float64)
    for g in groups:
        dims = np.asarray(g.dims)
        xg = fake_quant(x[..., dims], np.float32(g.amax / 127))
        wg = w[dims, :]
        ws = (np.max(np.abs(wg), axis=0).astype(np.float64) / 127).astype(np.float32)
        expected += xg.astype(np.float64) @ (np.clip(np.rint(wg / ws), -127, 127) * ws).astype(np.float64)
    np.testing.assert_allclose(out[fc1.outputs[0]], expected, rtol=1e-4, atol=1e-4)


def test_fp16_fallback_casts_and_weights(toy: Toy, feeds: dict[str, np.ndarray]) -> None:
    from builder.recipes.overrides import parse_fallbacks

    model, report, _ = toy
    rules = tuple(o.to_rule() for o in parse_fallbacks(["layer.1.fc2=fp16", "role:softmax=fp16"]))
    q = lowered(toy, load_preset("int8-gemm").with_rules(rules))
    fc2 = report.find(Role.FC2, 1)
    assert fc2 is not None and fc2.weight is not None
    node = next(n for n in q.model.graph.node if n.name == fc2.node)
    weight = next(i for i in q.model.graph.initializer if i.name == node.input[1])
    assert weight.data_type == TensorProto.FLOAT16
    assert q.precision[fc2.node] == "fp16"
    assert len(ops(q.model, "Cast")) > len(ops(model, "Cast"))
    ref = run_ort(model, feeds)
    out = run_ort(q.model, feeds)
    name = model.graph.output[0].name
    np.testing.assert_allclose(out[name], ref[name], atol=0.15)


def test_fp16_preset_converts_the_whole_graph(toy: Toy, feeds: dict[str, np.ndarray]) -> None:
    model, _, _ = toy
    q = lowered(toy, "fp16")
    assert not any(i.data_type == TensorProto.FLOAT for i in q.model.graph.initializer)
    name = model.graph.output[0].name
    out = run_ort(q.model, feeds)[name]
    ref = run_ort(model, feeds)[name]
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, atol=0.02)


def test_lowering_is_deterministic(toy: Toy) -> None:
    for recipe in ("int8-gemm", "hero-m3", "bondarenko-peg"):
        assert lowered(toy, recipe).serialize() == lowered(toy, recipe).serialize()


def test_old_opset_is_rejected(toy: Toy) -> None:
    model, report, stats = toy
    old = onnx.ModelProto()
    old.CopyFrom(model)
    for o in old.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = 12
    with pytest.raises(BuildError, match="opset 12 is below 13"):
        lower_plan(old, plan(report, load_preset("int8-gemm"), stats))


def test_plan_for_another_model_is_rejected(toy: Toy) -> None:
    model, report, stats = toy
    other = bert_block_model(layers=1, hidden=36, heads=2, ffn=72)
    p = plan(report, load_preset("int8-gemm"), stats)
    with pytest.raises(BuildError, match="no node named"):
        lower(other, p, quantize_weights(model, p))


def test_plugin_variant_fuses_layernorm_and_softmax_quantize(toy: Toy) -> None:
    model, report, stats = toy
    plugin = lower_plan(model, plan(report, load_preset("hero-m3"), stats), "plugin")
    kinds = [n.op_type for n in plugin.model.graph.node]
    assert kinds.count("LayerNormQuantize") == 5 and kinds.count("SoftmaxQuantize") == 2  # 5 LNs, 2 softmaxes
    assert plugin.variant == "plugin"


@pytest.mark.slow  # loading the onnxruntime-extensions custom-op library takes ~10 s
def test_plugin_variant_matches_portable(toy: Toy, feeds: dict[str, np.ndarray]) -> None:
    pytest.importorskip("onnxruntime_extensions", reason="plugin nodes run through onnxruntime-extensions")
    from builder.evaluate.runner import OrtRunner

    model, report, stats = toy
    p = plan(report, load_preset("hero-m3"), stats)
    plugin, portable = lower_plan(model, p, "plugin"), lower_plan(model, p, "portable")
    fused = {o for n in plugin.model.graph.node if n.op_type.endswith("Quantize") for o in n.output}
    int8 = [n.output[0] for n in ops(portable.model, "QuantizeLinear") if n.output[0] in fused]
    assert len(int8) >= 4  # the plugins write the INT8 tensors the QuantizeLinear nodes wrote
    a = OrtRunner(plugin.model, int8).run(feeds, int8)
    b = OrtRunner(portable.model, int8).run(feeds, int8)
    for name, x, y in zip(int8, a, b, strict=True):  # rounding ties may flip one step; flips propagate
        assert np.mean(np.abs(x.astype(np.int32) - y.astype(np.int32)) <= 1) >= 0.99, name


def test_bf16_fallback_structure(toy: Toy) -> None:
    from builder.recipes.overrides import parse_fallbacks

    _, report, _ = toy
    rules = tuple(o.to_rule() for o in parse_fallbacks(["role:softmax=bf16", "layer.0.fc1=bf16"]))
    q = lowered(toy, load_preset("int8-gemm").with_rules(rules))
    producers = {o: n for n in q.model.graph.node for o in n.output}
    for role, layer in ((Role.ATTN_SOFTMAX, 0), (Role.ATTN_SOFTMAX, 1), (Role.FC1, 0)):
        a = report.find(role, layer)
        assert a is not None
        node = next(n for n in q.model.graph.node if n.name == a.node)
        cast_in = producers[node.input[0]]
        assert cast_in.op_type == "Cast" and cast_in.attribute[0].i == TensorProto.BFLOAT16
        readers = [n for n in q.model.graph.node if node.output[0] in n.input]
        assert [r.op_type for r in readers] == ["Cast"] and readers[0].attribute[0].i == TensorProto.FLOAT
        assert q.precision[a.node] == "bf16"
    fc1 = report.find(Role.FC1, 0)
    assert fc1 is not None
    node = next(n for n in q.model.graph.node if n.name == fc1.node)
    assert next(i for i in q.model.graph.initializer if i.name == node.input[1]).data_type == TensorProto.BFLOAT16


def test_16bit_constants_round_to_nearest_even_and_clamp() -> None:
    import ml_dtypes

    from builder.lower.fallback import _to_low

    x = np.array([1.0, 1.00390625, 1.01171875, -3.3e38, 1e-40, 65504.0, 7e4, np.pi, -np.finfo(np.float32).max],
                 dtype=np.float32)
    bf16 = numpy_helper.to_array(_to_low(x, TensorProto.BFLOAT16)).view(np.uint16)
    finite = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)  # clamped, never rounded up to infinity
    np.testing.assert_array_equal(bf16, np.clip(x, -finite, finite).astype(ml_dtypes.bfloat16).view(np.uint16))
    fp16 = numpy_helper.to_array(_to_low(x, TensorProto.FLOAT16))
    assert np.all(np.isfinite(fp16))  # the FP32 mask constant becomes -65504, never -inf
    np.testing.assert_array_equal(fp16, np.clip(x, -65504, 65504).astype(np.float16))


def test_invariants_reject_a_wrong_weight_axis(toy: Toy) -> None:
    from builder.lower.checks import check_qdq_invariants
    from calib.errors import InternalError

    q = lowered(toy, "int8-gemm")
    check_qdq_invariants(q.model)
    broken = onnx.ModelProto()
    broken.CopyFrom(q.model)
    dq = next(n for n in broken.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8"))
    w = next(i for i in broken.graph.initializer if i.name == dq.input[0])
    assert w.dims[0] == w.dims[1]  # a square weight: a wrong axis keeps every shape valid
    next(a for a in dq.attribute if a.name == "axis").i = 0
    with pytest.raises(InternalError, match="output-channel axis 1"):
        check_qdq_invariants(broken)
    scale = next(n for n in broken.graph.node if n.op_type == "QuantizeLinear").input[1]
    init = next(i for i in broken.graph.initializer if i.name == scale)
    init.CopyFrom(numpy_helper.from_array(np.array(-1.0, dtype=np.float32), scale))
    with pytest.raises(InternalError, match="finite, positive"):
        check_qdq_invariants(broken)


def test_peg_splits_gemm_transb_consumers() -> None:
    from tests.toygraphs import gpt_block_model

    model = gpt_block_model(layers=1, hidden=36, heads=2, ffn=72, gemm_ffn=True)
    report = analyze(model, name="toy_gpt")
    q = lower_plan(model, plan(report, load_preset("bondarenko-peg"), toy_statistics(model, report)))
    fc1 = report.find(Role.FC1, 0)
    assert fc1 is not None and fc1.weight is not None and fc1.weight_axis == 0
    assert not any(n.name == fc1.node for n in q.model.graph.node)
    act = next(a for a in q.plan.activations if a.tensor == fc1.inputs[0])
    feeds = {"input_ids": real_feeds()["input_ids"]}
    out = run_ort(q.model, feeds, [fc1.inputs[0], fc1.outputs[0]])
    x = out[fc1.inputs[0]]
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    w, bias = original[fc1.weight], original[next(n for n in model.graph.node if n.name == fc1.node).input[2]]
    expected = np.zeros((x.shape[0], w.shape[0]), dtype=np.float64) + bias
    for g in act.params.groups:  # W is [N, K] (transB=1): groups slice its columns, channels are its rows
        dims = np.asarray(g.dims)
        wg = w[:, dims]
        ws = (np.max(np.abs(wg), axis=1).astype(np.float64) / 127).astype(np.float32)
        wq = (np.clip(np.rint(wg / ws[:, None]), -127, 127) * ws[:, None]).astype(np.float64)
        expected += fake_quant(x[:, dims], np.float32(g.amax / 127)).astype(np.float64) @ wq.T
    np.testing.assert_allclose(out[fc1.outputs[0]], expected, rtol=1e-4, atol=1e-4)


def test_adjacent_fallback_islands_leave_no_cast_round_trip(toy: Toy, feeds: dict[str, np.ndarray]) -> None:
    """Two FP16 nodes in a row (softmax -> P.V) share their boundary: no Cast(fp32) feeding a Cast(fp16)."""
    from builder.recipes.overrides import parse_fallbacks

    rules = tuple(o.to_rule() for o in parse_fallbacks(["layer.1=fp16"]))
    q = lowered(toy, load_preset("int8-gemm").with_rules(rules))
    producers = {o: n for n in q.model.graph.node for o in n.output}
    round_trips = [n.name for n in ops(q.model, "Cast")
                   if n.attribute[0].i == TensorProto.FLOAT16 and n.input[0] in producers
                   and producers[n.input[0]].op_type == "Cast"
                   and producers[n.input[0]].attribute[0].i == TensorProto.FLOAT]
    assert not round_trips
    _, report, _ = toy
    sm, pv = report.find(Role.ATTN_SOFTMAX, 1), report.find(Role.ATTN_PV, 1)
    assert sm is not None and pv is not None
    pv_node = next(n for n in q.model.graph.node if n.name == pv.node)
    assert producers[pv_node.input[0]].name == sm.node  # the FP16 softmax feeds the FP16 P.V directly
    name = q.model.graph.output[0].name
    assert np.all(np.isfinite(run_ort(q.model, feeds)[name]))


def test_invariants_reject_a_qdq_pair_with_unequal_scales(toy: Toy) -> None:
    from builder.lower.checks import check_qdq_invariants
    from calib.errors import InternalError

    q = lowered(toy, "int8-gemm")
    broken = onnx.ModelProto()
    broken.CopyFrom(q.model)
    dq = next(n for n in broken.graph.node if n.op_type == "DequantizeLinear" and not n.input[0].endswith("_int8"))
    scale = numpy_helper.to_array(next(i for i in broken.graph.initializer if i.name == dq.input[1]))
    broken.graph.initializer.append(numpy_helper.from_array((scale * np.float32(1.5)).astype(np.float32), "other"))
    dq.input[1] = "other"
    with pytest.raises(InternalError, match="unequal scales"):
        check_qdq_invariants(broken)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_bits_reach_the_lowered_weights(toy: Toy, bits: int) -> None:
    """The plan's weight bit width is what the WeightSet quantizes to (per channel, qmax = 2**(bits-1) - 1)."""
    from builder.quant.rtn import RtnConfig
    from builder.recipes.model import Rule, Selector, Settings

    model, report, _ = toy
    recipe = load_preset("int8-gemm").with_rules((Rule(select=Selector(roles=(Role.FC1,)),
                                                       set=Settings(weight=RtnConfig(bits=bits))),))
    q = lowered(toy, recipe)
    qmax = (1 << (bits - 1)) - 1
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for a in report.by_role(Role.FC1):
        assert a.weight is not None
        w = original[a.weight]
        values, scale = init(q.model, f"{a.weight}_int8"), init(q.model, f"{a.weight}_scale")
        expected_scale = (np.max(np.abs(w), axis=0).astype(np.float64) / qmax).astype(np.float32)
        np.testing.assert_array_equal(scale, expected_scale)
        np.testing.assert_array_equal(values, np.clip(np.rint(w / expected_scale), -qmax, qmax).astype(np.int8))
        assert int(np.max(np.abs(values))) == qmax
        edge = next(w_ for w_ in q.plan.weights if w_.node == a.node)
        assert edge.config == RtnConfig(bits=bits)
