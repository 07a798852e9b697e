"""TensorRT engine profiling: skipped with a message without a GPU; real CUDA-event timing on one."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.backends.options import BackendName, BuildOptions
from builder.engine.build import BuildInputs, build_engine_dir
from builder.profile.ort import TimingConfig
from builder.profile.sweep import ProfileTarget, SweepConfig, run_sweep
from calib.errors import BackendUnavailable
from tests.unit.test_backend_rtx import FAST, save, toy_qdq_model

QUICK = SweepConfig(batches=(1, 2), seqs=(8,), timing=TimingConfig(warmup_ms=10.0, iterations=50))


def _gpu_present() -> bool:
    try:
        from builder.profile.trt import _cuda

        _cuda()
    except (BackendUnavailable, ImportError):
        return False
    return True


def test_engine_without_gpu_profiles_onnx_and_skips_tensorrt(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (build-engine[rtx]) is not installed")
    if _gpu_present():
        pytest.skip("a GPU is present: TensorRT profiling is not skipped here")
    model = save(toy_qdq_model(), tmp_path / "toy.onnx")
    engine = build_engine_dir(BuildInputs(model_path=model), FAST, tmp_path / "engines" / "toy").engine_dir
    report = run_sweep([ProfileTarget(label="toy", path=engine)], QUICK, tokenizer=None)
    assert [r.runtime for r in report.results] == ["onnxruntime-cpu", "onnxruntime-cpu"]
    assert len(report.skipped) == 1 and "toy tensorrt" in report.skipped[0]


def test_shapes_outside_the_profile_are_skipped(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (build-engine[rtx]) is not installed")
    model = save(toy_qdq_model(), tmp_path / "toy.onnx")
    engine = build_engine_dir(BuildInputs(model_path=model), FAST, tmp_path / "engines" / "toy").engine_dir
    wide = SweepConfig(batches=(64,), seqs=(8,), devices=(), timing=QUICK.timing)
    report = run_sweep([ProfileTarget(label="toy", path=engine)], wide, tokenizer=None)
    assert report.results == ()
    assert report.skipped == ("toy tensorrt b=64 s=8: outside the engine's profile",)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_latency_split(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="full TensorRT is not installed")
    if not _gpu_present():
        pytest.skip("no NVIDIA GPU")
    model = save(toy_qdq_model(), tmp_path / "toy.onnx")
    options = BuildOptions.from_dict({**FAST.to_dict(), "backend": BackendName.TENSORRT.value})
    engine = build_engine_dir(BuildInputs(model_path=model), options, tmp_path / "engines" / "toy").engine_dir
    report = run_sweep([ProfileTarget(label="toy", path=engine)], QUICK, tokenizer=None)
    trt_results = [r for r in report.results if r.runtime == "tensorrt"]
    assert len(trt_results) == 2
    for r in trt_results:
        assert r.h2d is not None and r.d2h is not None and r.compute.count >= 50
        assert r.latency.mean_ms == pytest.approx(r.h2d.mean_ms + r.compute.mean_ms + r.d2h.mean_ms, rel=1e-6)
