"""Model intake: the MiniLM export matches the PyTorch model on real sentences and has the promised shape."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from builder.intake.export import EXPORT_TOLERANCE, INPUT_NAMES, OUTPUT_NAMES, max_abs_diff_vs_torch
from builder.intake.minilm import ensure_minilm_onnx, minilm_model_dir, minilm_onnx_cache_path


def test_export_matches_pytorch_on_vader_sentences(minilm_onnx: Path) -> None:
    from calib.data import vader_movie_sentences

    sentences = [s.text for s in vader_movie_sentences()[:16]]
    diff = max_abs_diff_vs_torch(minilm_model_dir(), minilm_onnx, sentences)
    assert diff <= EXPORT_TOLERANCE, f"ONNX export differs from PyTorch by {diff}"


def test_export_has_dynamic_axes_and_eager_attention(minilm_onnx: Path) -> None:
    model = onnx.load(str(minilm_onnx), load_external_data=False)
    assert tuple(i.name for i in model.graph.input) == INPUT_NAMES
    assert tuple(o.name for o in model.graph.output) == OUTPUT_NAMES
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "sequence"]
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Softmax"] == 6  # one per layer: attention is eager, not fused SDPA
    assert ops["MatMul"] == 6 * 8  # q, k, v, qk, pv, out, fc1, fc2 per layer
    assert ops["LayerNormalization"] == 13  # embeddings + 2 per layer


def test_export_is_cached(minilm_onnx: Path, tmp_path: Path) -> None:
    assert ensure_minilm_onnx() == minilm_onnx
    assert minilm_onnx_cache_path(tmp_path).parent.parent == tmp_path
    mtime = minilm_onnx.stat().st_mtime_ns
    ensure_minilm_onnx()
    assert minilm_onnx.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_fresh_export_into_empty_cache(tmp_path: Path) -> None:
    path = ensure_minilm_onnx(tmp_path)
    assert path.is_file() and path.parent.parent == tmp_path
    onnx.checker.check_model(str(path))
