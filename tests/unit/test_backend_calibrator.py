"""The implicit-INT8 calibrator, called the way TensorRT calls it: batch size, get_batch, read/write cache."""

from __future__ import annotations

import struct

import pytest

from builder.backends.calibrator import CacheCalibrator, make_trt_calibrator
from calib.errors import CalibrationError, ConfigError

# written independently: big-endian float32 of amax/127 (exactly 1/127 is 3c010204)
AMAX = {"input_ids_embed": 1.0, "/encoder/layer.0/attention/output/dense/MatMul_output_0": 12.5}
CACHE = "TRT-8501-EntropyCalibration2\n" + "".join(
    f"{name}: {struct.pack('>f', amax / 127.0).hex()}\n" for name, amax in AMAX.items()
)


def test_known_cache_value() -> None:
    assert "input_ids_embed: 3c010204" in CACHE


@pytest.mark.parametrize(("version", "header"), [("10.3.0", "TRT-100300"), ("10.16.1.11", "TRT-101601")])
def test_header_follows_the_running_tensorrt(version: str, header: str) -> None:
    calibrator = CacheCalibrator(CACHE, trt_version=version)
    assert calibrator.header == f"{header}-EntropyCalibration2"
    assert calibrator.read_calibration_cache().decode().splitlines()[0] == calibrator.header


def test_calibrator_answers_like_tensorrt_expects() -> None:
    calibrator = CacheCalibrator(CACHE, trt_version="10.3.0", batch_size=8)
    # TensorRT first asks for the batch size, then reads the cache; with a matching header it never asks for data
    assert calibrator.get_batch_size() == 8
    cache = calibrator.read_calibration_cache()
    lines = cache.decode().splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    assert lines[1:] == CACHE.splitlines()[1:]
    assert calibrator.cache_reads == 1
    # if TensorRT did ask for data anyway, the answer is "exhausted", never random data
    assert calibrator.get_batch(["input_ids", "attention_mask"]) is None
    calibrator.write_calibration_cache(b"TRT-100300-EntropyCalibration2\nx: 3c010204\n")
    assert calibrator.written is not None and calibrator.written.startswith(b"TRT-100300")


def test_scales_are_the_float32_of_amax_over_127() -> None:
    calibrator = CacheCalibrator(CACHE, trt_version="10.3.0")
    assert calibrator.source_header == "TRT-8501-EntropyCalibration2"
    for name, amax in AMAX.items():
        assert float(calibrator.cache.scales[name]) == struct.unpack(">f", struct.pack(">f", amax / 127.0))[0]


def test_missing_tensors_are_listed() -> None:
    calibrator = CacheCalibrator(CACHE, trt_version="10.3.0")
    assert calibrator.missing(["input_ids_embed", "other"]) == ["other"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("garbage\nx: 3c010204\n", "header"),
        ("TRT-8501-EntropyCalibration2\n", "no tensor scales"),
        ("TRT-8501-EntropyCalibration2\nx: 3c0102\n", "line 2"),
        ("TRT-8501-EntropyCalibration2\nx: 00000000\n", "finite and positive"),
        ("TRT-8501-EntropyCalibration2\nx: 7f800000\n", "finite and positive"),
        ("TRT-8501-MinMaxCalibration\nx: 3c010204\n", "EntropyCalibration2"),
    ],
)
def test_bad_caches_are_calibration_errors(text: str, match: str) -> None:
    with pytest.raises(CalibrationError, match=match):
        CacheCalibrator(text, trt_version="10.3.0")


def test_bad_batch_size_and_version() -> None:
    with pytest.raises(ConfigError):
        CacheCalibrator(CACHE, trt_version="10.3.0", batch_size=0)
    with pytest.raises(ConfigError, match="version"):
        CacheCalibrator(CACHE, trt_version="ten")


@pytest.mark.tensorrt
def test_real_tensorrt_calibrator_subclass() -> None:
    trt = pytest.importorskip("tensorrt", reason="full TensorRT is not installed")
    if int(trt.__version__.split(".")[0]) >= 11:
        pytest.skip("TensorRT 11 removed the calibrator interface")
    core = CacheCalibrator(CACHE, trt_version=trt.__version__, batch_size=4)
    calibrator = make_trt_calibrator(trt, core)
    assert isinstance(calibrator, trt.IInt8EntropyCalibrator2)
    assert calibrator.get_algorithm() == trt.CalibrationAlgoType.ENTROPY_CALIBRATION_2
    assert calibrator.get_batch_size() == 4
    assert calibrator.get_batch(["x"]) is None
    assert calibrator.read_calibration_cache().decode().splitlines()[0].startswith("TRT-1")


def test_wrapper_without_calibrator_interface_is_refused() -> None:
    rtx = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    with pytest.raises(ConfigError, match="no calibrator interface"):
        make_trt_calibrator(rtx, CacheCalibrator(CACHE, trt_version="10.3.0"))
