"""The search slice (held-out calibration-side data, never the test split) and its metrics against independent
computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.search.budget import ModelKind
from builder.search.scoring import language_slice, model_kind, prepare_scorer, sentence_slice
from calib.errors import CalibrationError, ConfigError
from calib.text_encoder import TextEncoder
from tests.toygraphs import bert_block_model


def test_the_sentence_slice_is_held_out_train_data() -> None:
    from calib.data import calibration_texts, vader_splits

    calibration = calibration_texts("vader", 1024)  # more than the 512 the evaluation split assumes
    data = sentence_slice(calibration, 300)
    splits = vader_splits(seed=0)
    train, test = {s.text for s in splits.train}, {s.text for s in splits.test}
    assert len(data.texts) == 300 and len(set(data.texts)) == 300
    assert set(data.texts) <= train and not set(data.texts) & set(calibration) and not set(data.texts) & test
    assert not set(data.probe_texts) & (set(data.texts) | set(calibration) | test)
    assert len(data.probe_texts) == len(train - set(calibration)) - 300
    labels = {s.text: s.rating > 0 for s in splits.train}
    assert data.labels == tuple(labels[t] for t in data.texts)
    assert sentence_slice(calibration, 300) == data  # deterministic
    assert data.head(10).texts == data.texts[:10] and data.head(10).samples == 10


def test_a_slice_larger_than_the_held_out_sentences_is_refused() -> None:
    with pytest.raises(ConfigError, match="use at most"):
        sentence_slice([], 5000)


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, TextEncoder]:
    from builder.evaluate.tokenizer import model_text_encoder
    from builder.intake.minilm import tokenizer_json_path

    model = bert_block_model(layers=1, hidden=32)
    return model, model_text_encoder(model, tokenizer_json_path())


def test_sentence_metrics_equal_the_evaluation_modules(toy: tuple[onnx.ModelProto, TextEncoder], tmp_path: Path
                                                        ) -> None:
    from builder.evaluate.metrics import fit_probe, row_cosine
    from builder.evaluate.runner import OrtRunner, Pooling, embed_texts
    from calib.data import calibration_texts
    from tests.unit.test_search_units import calibrated_toy

    model, encoder = toy
    assert model_kind(model, encoder) == ModelKind.SENTENCE
    data = sentence_slice(calibration_texts("vader", 16), 40)
    scorer = prepare_scorer(model, encoder, data, with_probe=True, batch_size=8, cache_dir=tmp_path)
    fp32 = OrtRunner(model)
    own = [{scorer.fetch[0]: fp32.run(f, list(scorer.fetch))[0]} for f in scorer.feeds]
    assert scorer.metrics(own) == {"cosine": pytest.approx(1.0, abs=1e-6), "cosine-min": pytest.approx(1.0, abs=1e-6),
                                   "probe-drop": 0.0}
    quantized = _hero_m3(calibrated_toy(layers=1))
    runner = OrtRunner(quantized)
    got = scorer.metrics([{scorer.fetch[0]: runner.run(f, list(scorer.fetch))[0]} for f in scorer.feeds])
    pooling = Pooling(output="last_hidden_state", mean=True)
    ref = embed_texts(fp32, encoder, data.texts, pooling, 8)
    emb = embed_texts(runner, encoder, data.texts, pooling, 8)
    cosine = row_cosine(emb, ref)
    probe = fit_probe(embed_texts(fp32, encoder, data.probe_texts, pooling, 8), data.probe_labels)
    drop = 100 * (probe.accuracy(ref, data.labels) - probe.accuracy(emb, data.labels))
    assert got["cosine"] == pytest.approx(float(np.mean(cosine)), rel=0, abs=1e-7)
    assert got["cosine-min"] == pytest.approx(float(np.min(cosine)), rel=0, abs=1e-7)
    assert got["probe-drop"] == pytest.approx(drop, abs=1e-9)
    assert got["cosine"] < 1.0 - 1e-6
    again = prepare_scorer(model, encoder, data, with_probe=True, batch_size=8, cache_dir=tmp_path)  # from the cache
    assert list(tmp_path.glob("fp32-reference-*.npz")) and again.metrics(own) == scorer.metrics(own)


def _hero_m3(toy: object) -> onnx.ModelProto:
    from builder.pipeline import quantize

    return quantize(toy.model, toy.report, toy.base, toy.statistics).model.model  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def tiny_llama() -> Path:
    pytest.importorskip("transformers")
    from tests.tiny_decoder import tiny_llama as export

    return export()


def test_language_metrics_equal_an_independent_perplexity(tiny_llama: Path) -> None:
    from builder.evaluate.fidelity import log_softmax
    from builder.evaluate.runner import OrtRunner
    from builder.evaluate.tokenizer import model_text_encoder
    from calib.data import calibration_texts, corpus_split, passages

    model = onnx.load(str(tiny_llama))
    encoder = model_text_encoder(tiny_llama)
    assert model_kind(model, encoder) == ModelKind.LANGUAGE
    calibration = calibration_texts("lee", 8)
    data = language_slice("lee", calibration, encoder, window=48, windows=3)
    assert data.windows is not None and data.windows.ids.shape == (3, 48)
    held = [p for doc in corpus_split("lee").calibration for p in passages(doc) if p not in set(calibration)]
    first = encoder.token_ids(held[0])
    assert data.windows.ids[0, :min(len(first), 48)].tolist() == first[:48]
    scorer = prepare_scorer(model, encoder, data)
    runner = OrtRunner(model)
    outputs = [{"logits": runner.run(f, ["logits"])[0]} for f in scorer.feeds]
    nll, count = 0.0, 0
    for ids, out in zip(data.windows.ids, outputs, strict=True):
        rows = log_softmax(out["logits"][0][:-1])
        nll -= float(rows[np.arange(ids.size - 1), ids[1:]].sum())
        count += ids.size - 1
    assert scorer.metrics(outputs) == {"perplexity": pytest.approx(math.exp(nll / count), rel=1e-12), "top1": 1.0}
    assert scorer.reference_metrics()["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-12)


def test_a_corpus_without_held_out_passages_is_refused(tiny_llama: Path) -> None:
    from builder.evaluate.tokenizer import model_text_encoder
    from calib.data import corpus_split, passages

    every = [p for doc in corpus_split("lee").calibration for p in passages(doc)]
    with pytest.raises(CalibrationError, match="calibrate on fewer samples"):
        language_slice("lee", every, model_text_encoder(tiny_llama), window=16, windows=1)
