"""TensorRT engine profiling: skipped with a message without a GPU; real CUDA-event timing on one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.backends.options import BackendName, BuildOptions
from builder.engine.build import BuildInputs, build_engine_dir
from builder.profile.ort import TimingConfig
from builder.profile.sweep import ProfileTarget, SweepConfig, run_sweep
from calib.errors import BackendUnavailable, ConfigError
from tests.unit.test_backend_rtx import FAST, save, toy_qdq_model

QUICK = SweepConfig(batches=(1, 2), seqs=(8,), timing=TimingConfig(warmup_ms=10.0, iterations=50))


def _gpu_present() -> bool:
    try:
        from builder.profile.trt import _cuda

        _cuda()
    except (BackendUnavailable, ConfigError, ImportError):
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


def test_bf16_bits_round_to_nearest_even_like_torch() -> None:
    torch = pytest.importorskip("torch")
    from builder.profile.trt_io import bf16_bits

    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(10_000).astype(np.float32) * 1e3,
                             np.array([0.0, -0.0, 1.0, 65504.0, 3.4e38, -1e-40, np.inf, -np.inf], np.float32),
                             # exact ties between two bf16 values: the low 16 bits are 0x8000
                             (np.arange(0x3F800000, 0x3F800000 + 64 * 0x10000, 0x10000, dtype=np.uint32)
                              + np.uint32(0x8000)).view(np.float32)])
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits(values), want)
    assert bf16_bits(np.array([np.nan], np.float32))[0] == 0x7FC0


def test_host_buffers_exist_for_every_tensorrt_type() -> None:
    """trt.nptype raises for BF16/FP8/INT4/FP4; every type gets storage of its width here."""
    from builder.profile.trt_io import STORAGE, host_buffer

    feed = np.linspace(-2, 2, 24, dtype=np.float32).reshape(2, 3, 4)
    widths = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT8": 1, "INT32": 4, "INT64": 8, "BOOL": 1, "UINT8": 1,
              "FP8": 1, "E8M0": 1, "INT4": 0.5, "FP4": 0.5}
    assert set(widths) == set(STORAGE)
    for kind, width in widths.items():
        out = host_buffer(kind, (2, 3, 4))
        assert out.nbytes == int(24 * width) and out.flags.c_contiguous
    np.testing.assert_array_equal(host_buffer("HALF", (2, 3, 4), feed), feed.astype(np.float16))
    with pytest.raises(ConfigError, match="does not match"):
        host_buffer("FLOAT", (2, 3), feed)
    with pytest.raises(ConfigError, match="known"):
        host_buffer("COMPLEX", (1,))


def test_profile_cli_checks_its_output_folder_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from builder.cli.main import main

    model = save(toy_qdq_model(), tmp_path / "toy.onnx")
    out = tmp_path / "missing" / "report"
    assert main(["profile", str(model), "-o", str(out), "--iterations", "1", "--warmup-ms", "0"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "does not exist" in err and not (tmp_path / "missing").exists()
