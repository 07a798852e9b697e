"""AccuracyReport artifact: JSON round trip, validation, worst-layer ranking."""

from __future__ import annotations

import json

import pytest

from builder.evaluate.report import ACCURACY_REPORT_VERSION, AccuracyReport, LayerError
from calib.errors import ConfigError


def _report(**overrides: object) -> AccuracyReport:
    fields: dict[str, object] = {
        "model_name": "int8-gemm",
        "num_train": 100,
        "num_test": 50,
        "num_pairs": 10,
        "probe_accuracy": 0.76,
        "probe_accuracy_refit": 0.755,
        "reference_probe_accuracy": 0.765,
        "cosine_mean": 0.98,
        "cosine_min": 0.9,
        "spearman": 0.5,
        "reference_spearman": 0.51,
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
    report = _report()
    again = AccuracyReport.from_json(report.to_json())
    assert again == report
    assert again.to_json() == report.to_json()
    assert json.loads(report.to_json())["version"] == ACCURACY_REPORT_VERSION


def test_round_trip_with_skipped_refit_and_no_share() -> None:
    report = _report(probe_accuracy_refit=None, int8_gemm_share=None, layer_errors=(), warnings=())
    assert AccuracyReport.from_json(report.to_json()) == report


def test_worst_layers_skip_missing_tensors_and_sort_by_error() -> None:
    worst = _report().worst_layers(count=5)
    assert [e.layer for e in worst] == [1, 0]
    assert _report().probe_delta == pytest.approx(-0.005)


def test_unknown_version_is_rejected() -> None:
    data = json.loads(_report().to_json())
    data["version"] = 99
    with pytest.raises(ConfigError, match="version 99"):
        AccuracyReport.from_json(json.dumps(data))


def test_non_finite_accuracy_is_rejected() -> None:
    with pytest.raises(ConfigError, match="probe_accuracy"):
        _report(probe_accuracy=float("nan"))


def test_unknown_layer_point_is_rejected() -> None:
    with pytest.raises(ConfigError, match="'mlp' unknown"):
        LayerError(layer=0, point="mlp", tensor="t", relative_error=0.1, max_abs_error=0.1)


def test_invalid_json_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        AccuracyReport.from_json("{not json")
