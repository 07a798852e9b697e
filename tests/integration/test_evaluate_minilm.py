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
    assert fp32_row.sentence is not None and fp32_row.sentence.cosine_min == pytest.approx(1.0)
    assert fp32_row.int8_gemm_share == 0.0
    # a probe fit on only 120 real sentences scores 60% on these 100 (chance is about 50%)
    assert 0.55 < reference.probe_accuracy <= 1.0
    model = ort_quantize(fp32, _calibration_feeds(64), ORT_BASELINES["ort-gemm-pc-sym"], report)
    result = evaluate(fp32, model, report, small_data, reference, name="ort-gemm-pc-sym")
    assert result.sentence is not None and 0.5 < result.sentence.cosine_mean < 0.99
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
    from builder.pipeline import calibrate, quantize, resolve_recipe

    feeds = _calibration_feeds(512)
    statistics = calibrate(fp32, report, feeds).statistics
    data = load_eval_data()
    assert len(data.test_texts) >= 2000
    reference = prepare_reference(fp32, data)
    lowered = quantize(fp32, report, resolve_recipe("int8-gemm", report), statistics).model.model
    ours = evaluate(fp32, lowered, report, data, reference)
    theirs = evaluate(fp32, ort_quantize(fp32, feeds, ORT_BASELINES["ort-matmul"], report), report, data, reference)
    assert ours.sentence is not None and theirs.sentence is not None
    assert ours.sentence.probe_accuracy >= reference.probe_accuracy - 0.005
    assert ours.sentence.cosine_mean >= 0.985
    assert ours.sentence.probe_accuracy > theirs.sentence.probe_accuracy
    assert ours.sentence.cosine_mean > theirs.sentence.cosine_mean
