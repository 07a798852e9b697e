"""ONNX Runtime quantize_static baseline on a toy encoder calibrated with real sentences."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.evaluate.flops import gemm_costs, int8_gemm_share
from builder.evaluate.metrics import row_cosine
from builder.evaluate.ort_baseline import ORT_BASELINES, baseline, ort_quantize, weight_gemm_nodes
from builder.evaluate.runner import Feeds, batches, embed
from builder.graph.analyze import analyze
from builder.graph.report import GraphReport
from calib.errors import CalibrationError, ConfigError
from tests.unit.test_evaluate_runner import pooled_toy


@pytest.fixture(scope="module")
def toy() -> onnx.ModelProto:
    return pooled_toy()


@pytest.fixture(scope="module")
def report(toy: onnx.ModelProto) -> GraphReport:
    return analyze(toy, name="toy")


@pytest.fixture(scope="module")
def sentences() -> tuple[list[str], list[str]]:
    from calib.data import vader_splits

    splits = vader_splits()
    return [s.text for s in splits.calibration[:32]], [s.text for s in splits.test[:24]]


def _feeds(texts: list[str]) -> list[Feeds]:
    return [feed for _, feed in batches(texts, batch_size=8)]


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


@pytest.fixture(scope="module")
def quantized(
    toy: onnx.ModelProto, report: GraphReport, sentences: tuple[list[str], list[str]]
) -> dict[str, onnx.ModelProto]:
    before = toy.SerializeToString()
    out = {name: ort_quantize(toy, _feeds(sentences[0]), cfg, report) for name, cfg in ORT_BASELINES.items()}
    assert toy.SerializeToString() == before, "quantize_static must not modify the caller's model"
    return out


def test_matmul_baseline_quantizes_every_matmul(
    quantized: dict[str, onnx.ModelProto], sentences: tuple[list[str], list[str]]
) -> None:
    _, feed = next(batches(sentences[1][:2], batch_size=2))
    costs = gemm_costs(quantized["ort-matmul"], feed)
    assert all(c.int8 for c in costs)
    assert int8_gemm_share(costs) == 1.0


def test_gemm_baselines_quantize_exactly_the_weight_gemms_per_channel(
    quantized: dict[str, onnx.ModelProto], report: GraphReport, sentences: tuple[list[str], list[str]]
) -> None:
    _, feed = next(batches(sentences[1][:2], batch_size=2))
    for name in ("ort-gemm-pc", "ort-gemm-pc-sym"):
        model = quantized[name]
        costs = gemm_costs(model, feed)
        assert sorted(c.node for c in costs if c.int8) == sorted(weight_gemm_nodes(report))
        producers = {o: n for n in model.graph.node for o in n.output}
        for gemm in (n for n in model.graph.node if n.name in weight_gemm_nodes(report)):
            dq = producers[gemm.input[1]]
            scale = _initializer(model, dq.input[1])
            weight_int8 = _initializer(model, dq.input[0])
            assert weight_int8.dtype == np.int8
            assert scale.shape == (weight_int8.shape[1],)  # one scale per output channel of W[K, N]


def test_symmetric_baseline_has_zero_points_zero(quantized: dict[str, onnx.ModelProto]) -> None:
    def zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
        return [_initializer(model, n.input[2]) for n in model.graph.node if n.op_type == "QuantizeLinear"]

    sym = zero_points(quantized["ort-gemm-pc-sym"])
    assert sym and all(np.all(z == 0) for z in sym)
    assert any(np.any(z != 0) for z in zero_points(quantized["ort-gemm-pc"]))


def test_baselines_stay_close_to_fp32(
    toy: onnx.ModelProto, quantized: dict[str, onnx.ModelProto], sentences: tuple[list[str], list[str]]
) -> None:
    reference = embed(toy, sentences[1])
    for name, model in quantized.items():
        cosine = row_cosine(embed(model, sentences[1]), reference)
        assert cosine.mean() > 0.9, name
        assert cosine.mean() < 1.0 - 1e-7, f"{name} did not change the model at all"


def test_unknown_baseline_suggests_close_names() -> None:
    with pytest.raises(ConfigError, match="did you mean 'ort-gemm-pc'"):
        baseline("ort-gemm-pcc")


def test_bad_inputs_are_rejected(toy: onnx.ModelProto, sentences: tuple[list[str], list[str]]) -> None:
    with pytest.raises(ConfigError, match="needs the GraphReport"):
        ort_quantize(toy, _feeds(sentences[0][:8]), ORT_BASELINES["ort-gemm-pc"])
    with pytest.raises(CalibrationError, match="at least one calibration batch"):
        ort_quantize(toy, [], ORT_BASELINES["ort-matmul"])
    with pytest.raises(CalibrationError, match="lack the model input 'attention_mask'"):
        ort_quantize(toy, [{"input_ids": np.ones((1, 4), dtype=np.int64)}], ORT_BASELINES["ort-matmul"])
