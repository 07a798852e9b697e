"""ONNX Runtime profiling of a toy Q/DQ graph, the sweep, plots, and bad input to `profile`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from builder.cli.main import main
from builder.profile.feeds import make_feeds, onnx_inputs
from builder.profile.ort import TimingConfig, profile_onnxruntime
from builder.profile.report import LatencyReport
from calib.errors import BackendUnavailable, ConfigError
from tests.unit.test_backend_rtx import save, toy_qdq_model

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = TimingConfig(warmup_ms=20.0, iterations=50)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return save(toy_qdq_model(), tmp_path / "toy.onnx")


def test_feeds_follow_batch_and_sequence(toy: Path) -> None:
    feeds = make_feeds(onnx_inputs(toy), 3, 5, tokenizer_json=None)
    assert feeds["x"].shape == (3, 5, 16) and feeds["x"].dtype == np.float32
    outputs = ort.InferenceSession(str(toy)).run(None, dict(feeds))
    assert outputs[0].shape == (3, 5, 8)


def test_token_inputs_need_a_tokenizer(tmp_path: Path) -> None:
    from builder.profile.feeds import InputSpec

    with pytest.raises(ConfigError, match="--tokenizer"):
        make_feeds([InputSpec(name="input_ids", dtype="int64", dims=(None, None))], 1, 8, tokenizer_json=None)


def test_cpu_profile_times_every_iteration(toy: Path) -> None:
    feeds = make_feeds(onnx_inputs(toy), 2, 8, tokenizer_json=None)
    result = profile_onnxruntime(toy, feeds, label="toy", device="cpu", timing=QUICK)
    stats = result.latency
    assert stats.count == 50
    assert stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.p95_ms <= stats.p99_ms <= stats.max_ms
    assert result.compute == result.latency and result.h2d is None and result.d2h is None
    assert (result.batch, result.seq, result.runtime) == (2, 8, "onnxruntime-cpu")
    # throughput is runs per wall second, so it cannot exceed 1000 / the fastest run
    assert 0 < result.throughput_qps <= 1000.0 / stats.min_ms * 1.01


def test_cuda_device_without_provider_is_unavailable(toy: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has the CUDA provider")
    feeds = make_feeds(onnx_inputs(toy), 1, 4, tokenizer_json=None)
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        profile_onnxruntime(toy, feeds, label="toy", device="cuda", timing=QUICK)


def test_profile_cli_writes_json_and_plots(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    accuracy = tmp_path / "accuracy.json"
    accuracy.write_text(json.dumps({"toy": 0.75}))
    out = tmp_path / "report"
    code = main(["profile", f"toy={toy}", "--batch", "1,2", "--seq", "4", "--iterations", "50",
                 "--warmup-ms", "10", "--accuracy", str(accuracy), "-o", str(out)])
    assert code == 0
    report = LatencyReport.from_json((out / "latency.json").read_text())
    assert [(r.batch, r.seq) for r in report.results] == [(1, 4), (2, 4)]
    assert all(r.latency.count >= 50 for r in report.results)
    assert (out / "latency_vs_batch.png").read_bytes().startswith(PNG)
    assert (out / "accuracy_vs_latency.png").read_bytes().startswith(PNG)
    assert "toy" in capsys.readouterr().out


def test_profile_cli_bad_inputs(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty_engine = tmp_path / "engine"
    empty_engine.mkdir()
    assert main(["profile", str(empty_engine), "-o", str(tmp_path / "out")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert main(["profile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["profile", str(toy), "-o", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["profile", str(toy), "--batch", "1,x", "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
