"""The one-shot pipeline on MiniLM: every artifact written, a re-run reuses each step, bad input fails early."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest

from builder.cli.main import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_pipeline_writes_every_artifact_and_reuses(minilm_onnx: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "minilm-int8"
    argv = [str(minilm_onnx), "--recipe", "int8-gemm", "--samples", "32", "--arch", "sm86", "--opt-level", "0",
            "--no-evaluate", "--no-progress", "-o", str(out_dir)]
    code, out, _ = _run(argv, capsys)
    assert code == 0, out
    for name in ("model.onnx", "ranges.json", "calibration.cache", "recipe.yaml", "plan.json", "manifest.json",
                 "tensorrt_rtx.plan", "outliers.json", "stages.json"):
        assert (out_dir / name).is_file(), name
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["backend"] == "tensorrt-rtx" and manifest["recipe_name"] == "int8-gemm"
    lowered = onnx.load(str(out_dir / "model.onnx"))
    assert sum(n.op_type == "QuantizeLinear" for n in lowered.graph.node) > 0
    assert "reused" not in out
    code, out, _ = _run(argv, capsys)
    assert code == 0
    flat = re.sub(r"\s+", " ", out)
    for step in ("calibrate", "quantize", "build"):
        assert f"{step} reused (inputs unchanged)" in flat, out


def test_pipeline_with_evaluation_reports_accuracy(minilm_onnx: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "minilm-m2"
    code, out, _ = _run([str(minilm_onnx), "--recipe", "hero-m2", "--samples", "32", "--no-build", "--eval-test",
                         "64", "--eval-train", "128", "--no-progress", "-o", str(out_dir)], capsys)
    assert code == 0, out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["sentence"]["num_test"] == 64 and 0.9 < report["sentence"]["cosine_mean"] <= 1.0
    assert not (out_dir / "tensorrt_rtx.plan").exists()


def test_unknown_recipe_fails_before_any_work(minilm_onnx: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "bad"
    code, _, err = _run([str(minilm_onnx), "--recipe", "int8-gem", "--no-progress", "-o", str(out_dir)], capsys)
    assert code == 2
    assert "int8-gemm" in err  # close-match suggestion
    assert not out_dir.exists()


def test_override_of_missing_layer_fails_with_exit_2(minilm_onnx: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run([str(minilm_onnx), "--fallback", "layer.9.fc2=fp16", "--no-progress", "-o",
                         str(tmp_path / "x")], capsys)
    assert code == 2
    assert "layer.9" in err or "layer 9" in err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["demo", "--recipes", "int8-gemm", "--eval-test", "100", "--eval-train", "200",
                         "--engines", str(tmp_path), "--no-progress"], capsys)
    assert code == 0, out
    assert "summary" in out and "int8-gemm" in out.split("summary")[-1]
    assert (tmp_path / "minilm-int8-gemm" / "tensorrt_rtx.plan").is_file()
