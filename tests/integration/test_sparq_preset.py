"""The SPARQ presets on the real MiniLM export: the lowered graph equals the quantizer's NumPy reference bit for bit
in ONNX Runtime at every trimmed GEMM input, the plan's zero-pair counts hold the count on the calibration
sentences, the plain 4-bit baseline keeps its codes in [-7, 7]; the slow tests measure the accuracy effect
(SPARQ against plain 4-bit activations) and the plugin variant."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from builder.graph.report import Role
from builder.lower.sparq_ops import find_compositions
from builder.plan.artifact import QuantPlan
from builder.quant.lowbit import LowBitConfig, LowBitQuantizer, lowbit_counterpart
from builder.quant.sparq import SparqQuantizer
from builder.recipes.loader import load_preset
from calib.quant import quantize as int8_quantize
from calib.quant import scale_from_amax
from calib.sparq import sparq_int8, zero_pair_counts
from tests.unit.test_lower import run_ort

WEIGHT_ROLES = {Role.QKV, Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_OUT, Role.FC1, Role.FC2, Role.GEMM}


def _feeds(texts: list[str], max_length: int = 128, batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    from builder.intake.minilm import tokenizer_json_path
    from calib.tokenize import encode

    return list(encode(texts, tokenizer_json_path(), max_length=max_length, batch_size=batch_size))


def _test_feed(n: int = 12) -> dict[str, np.ndarray]:
    from calib.data import vader_splits

    [feed] = _feeds([s.text for s in vader_splits().test[:n]], batch_size=n)
    return feed


def _read_names(model: onnx.ModelProto, plan: QuantPlan) -> dict[str, tuple[str, str]]:
    """Per quantized tensor: (what its first consumer reads, the codes its DequantizeLinear reads)."""
    names = {}
    for edge in plan.activations:
        node = next(n for n in model.graph.node if n.name == edge.consumers[0])
        dq = next(n for n in model.graph.node if n.output[0] == node.input[0])
        assert dq.op_type == "DequantizeLinear"
        names[edge.tensor] = (node.input[0], dq.input[0])
    return names


@pytest.mark.parametrize("preset", ["sparq-b4", "sparq-v4"])
def test_preset_graph_equals_the_reference_on_minilm(minilm_quantize: Callable[..., Any], minilm_statistics: Any,
                                                     preset: str) -> None:
    report, _ = minilm_statistics
    lowered = minilm_quantize(preset)
    model, plan = lowered.model, lowered.plan
    gemm_inputs = {a.inputs[0] for a in report.assignments if a.role in WEIGHT_ROLES}
    assert {e.tensor for e in plan.activations} == gemm_inputs
    assert {e.quantizer for e in plan.activations} == {"sparq"}
    assert len(find_compositions(model.graph)) == len(gemm_inputs)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # standard ops only: TensorRT-RTX builds it
    names = _read_names(model, plan)
    out = run_ort(model, _test_feed(), [t for tensor, pair in names.items() for t in (tensor, *pair)])
    for edge in plan.activations:
        read, codes = names[edge.tensor]
        x = out[edge.tensor]
        np.testing.assert_array_equal(out[read], SparqQuantizer().reference(x, edge.params), err_msg=edge.tensor)
        np.testing.assert_array_equal(out[codes], sparq_int8(int8_quantize(x, scale_from_amax(edge.params.amax)),
                                                             edge.params.sparq))
    embedding = out["sentence_embedding"]
    assert np.all(np.isfinite(embedding))


def test_plan_counts_the_zero_pairs_of_the_calibration_sentences(minilm_onnx: Path,
                                                                 minilm_quantize: Callable[..., Any]) -> None:
    """Recount with calib.sparq on the calibration batches the shared statistics came from (conftest)."""
    from calib.data import calibration_texts

    plan = minilm_quantize("sparq-v4").plan
    model = onnx.load(str(minilm_onnx))
    tensors = [e.tensor for e in plan.activations]
    counts = {t: [0, 0] for t in tensors}
    for feed in _feeds(calibration_texts("vader", 32)):
        values = run_ort(model, feed, tensors)
        mask = feed["attention_mask"].astype(bool)
        for edge in plan.activations:
            counted = zero_pair_counts(int8_quantize(values[edge.tensor], scale_from_amax(edge.params.amax)), mask)
            counts[edge.tensor][0] += counted.pairs
            counts[edge.tensor][1] += counted.with_zero
    shares = []
    for edge in plan.activations:
        pairs, with_zero = counts[edge.tensor]
        assert edge.params.pairs == pairs
        assert edge.params.zero_pairs_low <= with_zero <= edge.params.zero_pairs_high, edge.tensor
        shares.append(edge.params.zero_pair_share)
    assert max(shares) > 0.05  # some GEMM inputs (the GELU outputs) hold many zero codes


def test_plain_4_bit_baseline_holds_4_bit_codes(minilm_onnx: Path, minilm_statistics: Any) -> None:
    from builder.pipeline import quantize

    report, statistics = minilm_statistics
    model = onnx.load(str(minilm_onnx))
    recipe = lowbit_counterpart(load_preset("sparq-b4"), LowBitConfig(bits=4, range="mse"), "a4-mse")
    result = quantize(model, report, recipe, statistics)
    names = _read_names(result.model.model, result.plan)
    out = run_ort(result.model.model, _test_feed(), [t for tensor, pair in names.items() for t in (tensor, *pair)])
    for edge in result.plan.activations:
        read, codes = names[edge.tensor]
        assert edge.quantizer == "lowbit" and edge.method == "mse@4b"
        assert out[codes].min() >= -7 and out[codes].max() <= 7
        np.testing.assert_array_equal(out[read], LowBitQuantizer().reference(out[edge.tensor], edge.params))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.slow
def test_sparq_beats_plain_4_bit_activations(minilm_onnx: Path, minilm_statistics: Any) -> None:
    """The paper's central claim on a transformer: at the same GEMM inputs, SPARQ's 4-bit windows stay far closer
    to FP32 than plain per-tensor 4-bit activations with their best range (the 99th percentile)."""
    from builder.pipeline import quantize

    report, statistics = minilm_statistics
    model = onnx.load(str(minilm_onnx))
    feed = _test_feed(48)
    reference = run_ort(model, feed)["sentence_embedding"]
    recipes = {name: load_preset(name) for name in ("sparq-b4", "sparq-v4")}
    a4 = LowBitConfig(bits=4, range="percentile", percentile=99.0)  # the best 4-bit range (bench.accuracy)
    recipes["a4-p99"] = lowbit_counterpart(recipes["sparq-b4"], a4, "a4-p99")
    cosine = {}
    for name, recipe in recipes.items():
        lowered = quantize(model, report, recipe, statistics).model.model
        cosine[name] = _cosine(reference, run_ort(lowered, feed)["sentence_embedding"])
    assert cosine["sparq-b4"] > 0.95 and cosine["sparq-v4"] > 0.95, cosine
    assert cosine["a4-p99"] < cosine["sparq-b4"] - 0.1, cosine


@pytest.mark.slow  # onnxruntime-extensions evaluates 36 SparqQuantize nodes through the NumPy reference
def test_plugin_variant_equals_portable_on_minilm(minilm_quantize: Callable[..., Any]) -> None:
    from plugins.ort_ops import make_session

    portable = minilm_quantize("sparq-v4").model
    plugin = minilm_quantize("sparq-v4", variant="plugin").model
    assert sum(n.op_type == "SparqQuantize" for n in plugin.graph.node) == len(find_compositions(portable.graph))
    feed = _test_feed(8)
    expected = run_ort(portable, feed)["sentence_embedding"]
    np.testing.assert_array_equal(make_session(plugin).run(["sentence_embedding"], feed)[0], expected)
