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
def minilm_calibration(minilm_onnx: Path) -> Any:
    """(GraphReport, Collection) of MiniLM over 32 VADER calibration sentences, collected once per session."""
    import onnx

    from builder.graph.analyze import analyze
    from builder.graph.targets import calibration_tensors
    from builder.intake.minilm import tokenizer_json_path
    from calib.collect import collect
    from calib.data import calibration_texts
    from calib.tokenize import encode

    model = onnx.load(str(minilm_onnx))
    report = analyze(model, name="minilm")
    feeds = encode(calibration_texts("vader", 32), tokenizer_json_path(), max_length=128, batch_size=16)
    return report, collect(model, feeds, calibration_tensors(model, report))


@pytest.fixture(scope="session")
def minilm_tables(minilm_calibration: Any) -> Callable[[str], list[Any]]:
    """``tables(preset)``: the RangeTables a preset needs (max primary), from the shared collection."""
    from builder.plan.ranges import tables_for_recipe
    from builder.recipes.loader import load_preset
    from calib.calibrate import RangeSpec
    from calib.range_table import RangeMethod

    _, collection = minilm_calibration

    def tables(preset: str) -> list[Any]:
        return tables_for_recipe(collection, load_preset(preset), RangeSpec(method=RangeMethod.MAX),
                                 model_name="minilm", data_source="vader:32")

    return tables
