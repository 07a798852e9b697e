"""Evaluation on the real MiniLM export: small real-text subsets here, the full acceptance run marked slow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.evaluate.evaluate import EvalData, evaluate, load_eval_data, prepare_reference, reference_report
from builder.evaluate.ort_baseline import ORT_BASELINES, ort_quantize
from builder.evaluate.runner import batches, embed
from builder.graph.analyze import analyze
from builder.graph.report import GraphReport


@pytest.fixture(scope="module")
def fp32(minilm_onnx: Path) -> onnx.ModelProto:
    return onnx.load(str(minilm_onnx))


@pytest.fixture(scope="module")
def report(fp32: onnx.ModelProto) -> GraphReport:
    return analyze(fp32, name="minilm")


@pytest.fixture(scope="module")
def small_data() -> EvalData:
    return load_eval_data(train_limit=120, test_limit=100, layer_sentences=16)


def _calibration_feeds(count: int) -> list[dict[str, np.ndarray]]:
    from calib.data import vader_splits

    return [feed for _, feed in batches([s.text for s in vader_splits().calibration[:count]], batch_size=16)]


def test_embeddings_do_not_depend_on_batching(fp32: onnx.ModelProto, small_data: EvalData) -> None:
    texts = list(small_data.test_texts[:12])
    together = embed(fp32, texts, batch_size=12)
    alone = np.stack([embed(fp32, [t], batch_size=1)[0] for t in texts])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


def test_ort_baseline_report_on_minilm(fp32: onnx.ModelProto, report: GraphReport, small_data: EvalData) -> None:
    reference = prepare_reference(fp32, small_data)
    fp32_row = reference_report(fp32, small_data, reference)
    assert fp32_row.cosine_min == pytest.approx(1.0) and fp32_row.int8_gemm_share == 0.0
    # a probe fit on only 120 real sentences scores 60% on these 100 (chance is about 50%)
    assert 0.55 < reference.probe_accuracy <= 1.0
    model = ort_quantize(fp32, _calibration_feeds(64), ORT_BASELINES["ort-gemm-pc-sym"], report)
    result = evaluate(fp32, model, report, small_data, reference, name="ort-gemm-pc-sym")
    assert 0.5 < result.cosine_mean < 0.99
    # share from MiniLM's dimensions: per token and layer the weight GEMMs do 4*h*h + 2*h*4h MACs,
    # QK^T and PV 2*S*h at S = 128, h = 384
    h, s = 384, 128
    weights = 4 * h * h + 2 * h * 4 * h
    assert result.int8_gemm_share == pytest.approx(weights / (weights + 2 * s * h))
    block = [e for e in result.layer_errors if e.point == "block"]
    assert len(block) == 6 and all(e.relative_error is not None and e.relative_error > 0.01 for e in block)
    assert result.warnings == ()


@pytest.mark.slow
def test_int8_gemm_meets_acceptance_and_beats_ort(fp32: onnx.ModelProto, report: GraphReport) -> None:
    """int8-gemm: probe within 0.5 point of FP32, mean cosine >= 0.985, better than quantize_static on both."""
    lower = pytest.importorskip("builder.lower.quantize")
    from builder.graph.targets import calibration_tensors
    from builder.plan.ranges import tables_for_recipe
    from builder.recipes.loader import load_preset
    from calib.calibrate import RangeSpec
    from calib.collect import collect
    from calib.range_table import RangeMethod

    feeds = _calibration_feeds(512)
    collection = collect(fp32, feeds, calibration_tensors(fp32, report))
    tables = tables_for_recipe(collection, load_preset("int8-gemm"), RangeSpec(method=RangeMethod.MAX),
                               model_name="minilm", data_source="vader:512")
    data = load_eval_data()
    assert len(data.test_texts) >= 2000
    reference = prepare_reference(fp32, data)
    ours = evaluate(fp32, lower.quantize(fp32, "int8-gemm", tables, report=report).model, report, data, reference)
    theirs = evaluate(fp32, ort_quantize(fp32, feeds, ORT_BASELINES["ort-matmul"], report), report, data, reference)
    assert ours.probe_accuracy >= reference.probe_accuracy - 0.005
    assert ours.cosine_mean >= 0.985
    assert ours.probe_accuracy > theirs.probe_accuracy and ours.cosine_mean > theirs.cosine_mean
