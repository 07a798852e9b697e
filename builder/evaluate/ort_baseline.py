"""Evaluation stage: ONNX Runtime's ``quantize_static`` as the peer baseline, on the same calibration data.

Three configurations, all QDQ with INT8 activations and weights and MinMax calibration (ONNX Runtime's
default), quantizing MatMul only (its all-ops default breaks on MiniLM's -inf attention mask):

- ``ort-matmul``: every MatMul (attention's QK^T and PV too), per-tensor weights, asymmetric activations;
- ``ort-gemm-pc``: only the weight GEMMs the GraphReport names, per-channel weights;
- ``ort-gemm-pc-sym``: the same with symmetric activations (zero-point 0, what TensorRT can run).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from builder.evaluate.runner import Feeds
from builder.graph.report import GraphReport
from calib.errors import CalibrationError, ConfigError, suggest

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class OrtBaseline:
    """One ``quantize_static`` configuration."""

    name: str
    weight_gemms_only: bool  # quantize only the weight GEMMs (not QK^T / PV)
    per_channel: bool
    symmetric_activations: bool


ORT_BASELINES: dict[str, OrtBaseline] = {
    b.name: b
    for b in (
        OrtBaseline(name="ort-matmul", weight_gemms_only=False, per_channel=False, symmetric_activations=False),
        OrtBaseline(name="ort-gemm-pc", weight_gemms_only=True, per_channel=True, symmetric_activations=False),
        OrtBaseline(name="ort-gemm-pc-sym", weight_gemms_only=True, per_channel=True, symmetric_activations=True),
    )
}


def baseline(name: str) -> OrtBaseline:
    """The baseline configuration called ``name`` (ConfigError with close matches if unknown)."""
    try:
        return ORT_BASELINES[name]
    except KeyError:
        raise ConfigError(
            f"unknown ONNX Runtime baseline {name!r}; known: {sorted(ORT_BASELINES)}{suggest(name, ORT_BASELINES)}"
        ) from None


class _FeedReader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of feeds restricted to the model's inputs."""

    def __init__(self, feeds: list[Feeds], input_names: tuple[str, ...]) -> None:
        self._feeds = feeds
        self._inputs = input_names
        self._iter: Iterator[Feeds] = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        feed = next(self._iter, None)
        return None if feed is None else {n: feed[n] for n in self._inputs}

    def rewind(self) -> None:
        self._iter = iter(self._feeds)


def weight_gemm_nodes(report: GraphReport) -> list[str]:
    """Names of the GEMM nodes that multiply by a weight initializer."""
    return [a.node for a in report.assignments if a.weight is not None]


def ort_quantize(
    model: onnx.ModelProto,
    feeds: Iterable[Feeds],
    config: OrtBaseline,
    report: GraphReport | None = None,
) -> onnx.ModelProto:
    """Quantize ``model`` with ONNX Runtime's ``quantize_static`` calibrated on ``feeds``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes: list[str] | None = None
    if config.weight_gemms_only:
        if report is None:
            raise ConfigError(f"baseline {config.name!r} needs the GraphReport to find the weight GEMMs")
        nodes = weight_gemm_nodes(report)
        if not nodes:
            raise ConfigError(f"baseline {config.name!r}: the GraphReport names no weight GEMM")
    initializers = {i.name for i in model.graph.initializer}
    input_names = tuple(i.name for i in model.graph.input if i.name not in initializers)
    data = list(feeds)
    if not data:
        raise CalibrationError("the ONNX Runtime baseline needs at least one calibration batch")
    missing = [n for n in input_names if n not in data[0]]
    if missing:
        raise CalibrationError(f"calibration feeds lack the model input {missing[0]!r}; they hold {sorted(data[0])}")
    # quantize_static rewrites a ModelProto argument in place (initializers moved to external data): pass a copy
    source = onnx.ModelProto()
    source.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix="ort-baseline-") as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_static(
            source,
            out,
            _FeedReader(data, input_names),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=config.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": config.symmetric_activations, "WeightSymmetric": True},
        )
        quantized = onnx.load(str(out))
    logger.info("ONNX Runtime baseline %s: %d nodes", config.name, len(quantized.graph.node))
    return quantized
