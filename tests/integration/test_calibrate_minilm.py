"""Calibration of the real MiniLM export on VADER sentences: every method, the mask path, outliers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from builder.graph.analyze import analyze
from builder.graph.targets import calibration_tensors
from calib.cache import cache_from_ranges, format_cache, parse_cache
from calib.collect import collect
from calib.data import calibration_texts
from calib.outliers import outlier_report
from calib.range_table import RangeMethod, RangeTable
from calib.ranges import RangeSpec, range_table, tensor_range
from calib.tokenize import encode

METHODS = (RangeSpec(method=RangeMethod.MAX), RangeSpec(method=RangeMethod.PERCENTILE, percentile=99.99),
           RangeSpec(method=RangeMethod.ENTROPY), RangeSpec(method=RangeMethod.MSE))


def _setup(minilm_onnx: Path) -> tuple[onnx.ModelProto, list[str], dict[str, tuple[int | None, str]], str]:
    from builder.intake.minilm import tokenizer_json_path

    model = onnx.load(str(minilm_onnx))
    report = analyze(model, name="minilm")
    tensors = calibration_tensors(model, report)
    softmax_inputs = [a.inputs[0] for a in report.assignments if a.role.value == "attn_softmax"]
    labels = {o: (a.layer, a.role.value) for a in report.assignments for o in a.outputs}
    return model, [*tensors, *softmax_inputs], labels, str(tokenizer_json_path())


def _check_collection(minilm_onnx: Path, samples: int) -> None:
    model, tensors, labels, tokenizer = _setup(minilm_onnx)
    collection = collect(model, encode(calibration_texts("vader", samples), Path(tokenizer)), tensors).statistics
    assert collection.samples == samples
    tables = {spec.method: range_table(collection, spec, model_name="minilm") for spec in METHODS}
    for method, table in tables.items():
        assert RangeTable.from_json(table.to_json()) == table
        assert set(table) == set(tensors), method
        for name in table:
            rng = table.get(name)
            assert 0 < rng.amax <= max(-rng.observed_min, rng.observed_max) * (1 + 1e-6), (method, name)
    text = format_cache(cache_from_ranges(tables[RangeMethod.ENTROPY]))
    assert format_cache(parse_cache(text)) == text
    # the softmax input carries the additive attention mask (float32 min on padded keys): excluded, finite
    softmax_in = tensors[-1]
    assert collection.tensors[softmax_in].minmax.minimum > -1e4
    assert tensor_range(collection.tensors[softmax_in], METHODS[2]).amax < 1e3
    report = outlier_report(collection.tensors, labels)
    ffn_rows = [r for r in report.rows if r.role in ("fc2", "ffn_residual")]
    assert len(ffn_rows) == 12
    counts = report.dimension_counts()
    top_dim = next(iter(counts))
    assert counts[top_dim] >= 6  # one structured outlier dimension recurs across layers (dim 99 in MiniLM)
    assert all(np.isfinite(r.range_share) for r in report.rows)


def test_calibration_on_64_sentences(minilm_onnx: Path) -> None:
    _check_collection(minilm_onnx, 64)


@pytest.mark.slow
def test_calibration_on_512_sentences_all_methods(minilm_onnx: Path) -> None:
    _check_collection(minilm_onnx, 512)
