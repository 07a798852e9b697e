"""Every pipeline stage on one model, through the library calls the CLI makes (for the matrix and zoo tests).

analyze -> calibrate on Lee text -> quantize (int8-gemm) -> a real TensorRT-RTX build -> evaluate against FP32,
with the checks every model must pass: INT8 weights over most GEMM FLOPs, a plan on disk, finite float outputs
within cosine 0.9 of FP32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from builder.backends.options import BackendName, BuildOptions, DimRange, ShapeProfile
from builder.engine.build import BuildInputs, build_engine_dir
from builder.evaluate.evaluate import evaluate, load_eval_data, prepare_reference
from builder.evaluate.tokenizer import model_text_encoder
from builder.graph.report import GraphReport
from builder.intake.prepare import prepare_model
from builder.pipeline import analyze_model, calibrate, quantize, resolve_recipe
from calib.artifact_io import atomic_write_bytes
from calib.data import calibration_texts
from calib.statistics import Statistics


@dataclass(frozen=True)
class StagesRun:
    """What each stage produced."""

    report: GraphReport
    feeds: list[dict[str, Any]]  # the calibration batches
    statistics: Statistics
    result: Any  # builder.pipeline's quantize result
    accuracy: Any  # builder.evaluate's AccuracyReport


def profile_for(model: onnx.ModelProto) -> ShapeProfile:
    cache = any(i.name.startswith("past_key_values") for i in model.graph.input)
    return ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=16, max=32),
                        past=DimRange(min=0, opt=16, max=32) if cache else None)


def every_stage(path: Path, name: str, tokenizer: Path, tmp_path: Path) -> StagesRun:
    prepared = prepare_model(path)
    report = analyze_model(prepared.model, name)
    assert report.num_layers >= 2 and report.architecture != "unknown"
    encoder = model_text_encoder(path, tokenizer)
    feeds = list(encoder.feeds(calibration_texts("lee", 16), max_length=32, batch_size=8, sort_by_length=True))
    statistics = calibrate(prepared.model, report, feeds).statistics
    result = quantize(prepared.model, report, resolve_recipe("int8-gemm", report), statistics)
    assert result.plan.weights and result.plan.int8_gemm_flop_share > 0.5
    folder = tmp_path / "engine"
    atomic_write_bytes(folder / "model.onnx", result.model.serialize())
    options = BuildOptions(backend=BackendName.TENSORRT_RTX, architectures=("sm86",), optimization_level=0,
                           profiles=(profile_for(result.model.model),))
    manifest = build_engine_dir(BuildInputs(model_path=folder / "model.onnx"), options, folder).manifest
    assert manifest.plan_bytes > 0 and (folder / manifest.plan_file).is_file()
    data = load_eval_data(train_limit=16, test_limit=16, layer_sentences=8, text_source="lee", window=32,
                          windows=2, new_tokens=4)
    reference = prepare_reference(prepared.model, data, encoder=encoder)
    accuracy = evaluate(prepared.model, result.model.model, report, data, reference, name=name)
    assert accuracy.outputs, accuracy.skipped
    for output in accuracy.outputs:
        assert np.isfinite(output.cosine_mean) and output.cosine_mean > 0.9, (output.name, output.cosine_mean)
    return StagesRun(report=report, feeds=feeds, statistics=statistics, result=result, accuracy=accuracy)
