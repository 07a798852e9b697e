"""AccuracyReport artifact (version 2): strict JSON round trip, validation, worst-layer ranking, headline."""

from __future__ import annotations

import json

import pytest

from builder.evaluate.report import (
    ACCURACY_REPORT_VERSION,
    AccuracyReport,
    CacheCheck,
    Generation,
    LanguageFigures,
    LayerError,
    OutputFidelity,
    SentenceFigures,
    Skipped,
)
from calib.errors import ConfigError


def _sentence(**overrides: object) -> SentenceFigures:
    fields: dict[str, object] = {
        "embedding": "output 'sentence_embedding'", "num_train": 100, "num_test": 50, "num_pairs": 10,
        "probe_accuracy": 0.76, "probe_accuracy_refit": 0.755, "reference_probe_accuracy": 0.765,
        "cosine_mean": 0.98, "cosine_min": 0.9, "spearman": 0.5, "reference_spearman": 0.51,
    }
    fields.update(overrides)
    return SentenceFigures(**fields)  # type: ignore[arg-type]


def _language() -> LanguageFigures:
    check = CacheCheck(positions=40, max_abs_diff=2e-6, max_abs_logit=20.0, tolerance=0.02, within=True,
                       argmax_equal=True)
    gen = Generation(prompt="Once", text=" upon", reference_text=" upon a", tokens=(5, 9), reference_tokens=(5, 7),
                     agreement=1)
    return LanguageFigures(corpus="shakespeare: ...", window=512, windows=8, tokens=4088, perplexity=12.5,
                           reference_perplexity=12.0, top1_agreement=0.91, kl_mean=0.05, generation=(gen,),
                           cache_check=check, reference_cache_check=check)


def _report(**overrides: object) -> AccuracyReport:
    fields: dict[str, object] = {
        "model_name": "int8-gemm",
        "computed": ("outputs", "probe"),
        "skipped": (Skipped(figure="perplexity", reason="no logits"),),
        "outputs": (OutputFidelity(name="logits", kind="logits", vectors=10, cosine_mean=0.99, cosine_min=0.9,
                                   relative_error=0.1, max_abs_error=1.5, top1_agreement=0.9, kl_mean=0.01),),
        "sentence": _sentence(),
        "int8_gemm_share": 0.947,
        "layer_errors": (
            LayerError(layer=0, point="attn", tensor="a0", relative_error=0.01, max_abs_error=0.2),
            LayerError(layer=0, point="block", tensor="b0", relative_error=0.05, max_abs_error=0.5),
            LayerError(layer=1, point="block", tensor="b1", relative_error=0.09, max_abs_error=1.5),
            LayerError(layer=2, point="block", tensor="b2", relative_error=None, max_abs_error=None),
        ),
        "warnings": ("layer 2 block: tensor 'b2' is not in the evaluated model",),
    }
    fields.update(overrides)
    return AccuracyReport(**fields)  # type: ignore[arg-type]


def test_round_trip_is_exact() -> None:
    for report in (_report(), _report(sentence=None, language=_language(), peak_rss_mib=812.5)):
        again = AccuracyReport.from_json(report.to_json())
        assert again == report
        assert again.to_json() == report.to_json()
        assert AccuracyReport.from_dict(json.loads(report.to_json())) == report
        assert json.loads(report.to_json())["version"] == ACCURACY_REPORT_VERSION == 2


def test_round_trip_with_skipped_refit_and_no_share() -> None:
    report = _report(sentence=_sentence(probe_accuracy_refit=None, spearman=None), int8_gemm_share=None,
                     layer_errors=(), warnings=())
    assert AccuracyReport.from_json(report.to_json()) == report


def test_worst_layers_views_and_headline() -> None:
    report = _report()
    assert [e.layer for e in report.worst_layers(count=5)] == [1, 0]
    assert report.probe_delta == pytest.approx(-0.005)
    assert (report.probe_accuracy, report.cosine_mean) == (0.76, 0.98)
    assert report.headline() == "probe 76.00% (FP32 76.50%), cosine mean 0.9800"
    lm = _report(sentence=None, language=_language())
    assert lm.probe_accuracy is None and lm.probe_delta is None
    assert lm.headline().startswith("perplexity 12.500 (FP32 12.000), next-token top-1 91.00%")
    assert lm.language is not None and lm.language.perplexity_ratio == pytest.approx(12.5 / 12.0)


def test_unknown_version_and_unknown_key_are_rejected() -> None:
    data = json.loads(_report().to_json())
    data["version"] = 1
    with pytest.raises(ConfigError, match="version 1 not supported; expected 2"):
        AccuracyReport.from_json(json.dumps(data))
    data["version"] = 2
    data["sentence"]["cosine_mena"] = 0.5
    with pytest.raises(ConfigError, match=r"unknown key 'cosine_mena'.*did you mean 'cosine_mean'"):
        AccuracyReport.from_json(json.dumps(data))


def test_non_finite_figures_are_rejected() -> None:
    with pytest.raises(ConfigError, match="probe_accuracy"):
        _sentence(probe_accuracy=float("nan"))
    with pytest.raises(ConfigError, match="kl_mean"):
        OutputFidelity(name="x", kind="logits", vectors=1, cosine_mean=1.0, cosine_min=1.0, relative_error=0.0,
                       max_abs_error=0.0, kl_mean=float("inf"))


def test_unknown_layer_point_and_output_kind_are_rejected() -> None:
    with pytest.raises(ConfigError, match="'mlp' unknown"):
        LayerError(layer=0, point="mlp", tensor="t", relative_error=0.1, max_abs_error=0.1)
    with pytest.raises(ConfigError, match="output kind 'probs' unknown"):
        OutputFidelity(name="x", kind="probs", vectors=1, cosine_mean=1.0, cosine_min=1.0, relative_error=0.0,
                       max_abs_error=0.0)


def test_invalid_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        AccuracyReport.from_json("{not json")
