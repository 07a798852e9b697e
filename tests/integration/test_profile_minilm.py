"""Latency report (JSON + PNG) for MiniLM FP32 and an INT8 Q/DQ MiniLM on ONNX Runtime CPU.

Percentiles come from at least 50 timed runs after warm-up per point; the sweep stays small (batch 1-2,
sequence 32) so CI stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest

from builder.cli.main import main
from builder.profile.report import LatencyReport

PNG = b"\x89PNG\r\n\x1a\n"


def int8_gemm_model(minilm_quantize: Any, out: Path) -> Path:
    """The `int8-gemm` portable variant (W8A8 GEMMs), ranges over 32 VADER calibration sentences."""
    out.write_bytes(minilm_quantize("int8-gemm").serialize())
    return out


@pytest.fixture(scope="module")
def int8_onnx(minilm_quantize: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return int8_gemm_model(minilm_quantize, tmp_path_factory.mktemp("int8") / "int8-gemm.onnx")


def test_minilm_latency_report(minilm_onnx: Path, int8_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(int8_onnx), load_external_data=False)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 0
    out = tmp_path / "report"
    code = main(["profile", f"fp32={minilm_onnx}", f"int8-gemm={int8_onnx}", "--batch", "1,2", "--seq", "32",
                 "--iterations", "50", "--warmup-ms", "100", "-o", str(out)])
    assert code == 0
    report = LatencyReport.from_json((out / "latency.json").read_text())
    points = sorted((r.label, r.batch, r.seq) for r in report.results)
    assert points == [("fp32", 1, 32), ("fp32", 2, 32), ("int8-gemm", 1, 32), ("int8-gemm", 2, 32)]
    for result in report.results:
        assert result.runtime == "onnxruntime-cpu" and result.latency.count >= 50
        assert result.latency.min_ms <= result.latency.median_ms <= result.latency.p99_ms
    assert (out / "latency_vs_batch.png").read_bytes().startswith(PNG)
