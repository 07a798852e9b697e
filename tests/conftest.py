"""Shared pytest fixtures: the real MiniLM export (cached) and common paths."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

REPO_ROOT = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every run (`make test` must not pass or fail by chance);
# HYPOTHESIS_PROFILE=explore searches afresh, for finding new counterexamples locally.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def minilm_onnx() -> Path:
    """The all-MiniLM-L6-v2 ONNX export (exported once, then read from the cache)."""
    from builder.intake.minilm import ensure_minilm_onnx

    return ensure_minilm_onnx()


@pytest.fixture(scope="session")
def minilm_statistics(minilm_onnx: Path) -> Any:
    """(GraphReport, Statistics) of MiniLM over 32 VADER calibration sentences, collected once per session with
    the on-demand SPARQ pair observer too (so the SPARQ presets plan without a second pass)."""
    import onnx

    from builder.intake.minilm import tokenizer_json_path
    from builder.pipeline import analyze_model, calibrate
    from calib.collect import CollectOptions
    from calib.data import calibration_texts
    from calib.statistics import DEFAULT_KINDS
    from calib.tokenize import encode

    model = onnx.load(str(minilm_onnx))
    report = analyze_model(model, "minilm")
    feeds = encode(calibration_texts("vader", 32), tokenizer_json_path(), max_length=128, batch_size=16)
    return report, calibrate(model, report, feeds, CollectOptions(kinds=(*DEFAULT_KINDS, "sparq_pairs"))).statistics


@pytest.fixture(scope="session")
def minilm_quantize(minilm_onnx: Path, minilm_statistics: Any) -> Callable[..., Any]:
    """``quantize(preset, variant="portable")``: the lowered MiniLM (builder.lower.pipeline.QuantizedModel)
    from the shared statistics; Bondarenko MP's flagged layers come from their outlier report."""
    import onnx

    from builder.pipeline import quantize, resolve_recipe

    report, statistics = minilm_statistics
    model = onnx.load(str(minilm_onnx))

    def run(preset: str, variant: str = "portable") -> Any:
        return quantize(model, report, resolve_recipe(preset, report), statistics, variant=variant).model

    return run
