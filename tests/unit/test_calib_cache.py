"""TensorRT calibration cache text: exact round trips, known encodings, bad input."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from calib.cache import CalibrationCache, cache_from_ranges, format_cache, parse_cache, tensorrt_header
from calib.errors import CalibrationError, ConfigError
from calib.range_table import RangeMethod, RangeTable, TensorRange

SAMPLE = "TRT-8501-EntropyCalibration2\ndata: 3c008912\n(Unnamed Layer* 3) [Shuffle]_output: 3c010204\n"


def test_known_sample_parses_and_formats_back_byte_for_byte() -> None:
    cache = parse_cache(SAMPLE)
    assert cache.header == "TRT-8501-EntropyCalibration2" and cache.algorithm == "EntropyCalibration2"
    assert cache.scales["(Unnamed Layer* 3) [Shuffle]_output"] == np.float32(1.0 / 127.0)
    assert cache.amax("data") == pytest.approx(0.996, abs=1e-3)
    assert format_cache(cache) == SAMPLE


def test_range_table_to_cache_and_back_keeps_float32_scales() -> None:
    ranges = {n: TensorRange(tensor=n, amax=a, method=RangeMethod.ENTROPY, observed_min=-a, observed_max=a)
              for n, a in (("a: with colon", 1.0), ("b", 6.335), ("c", 224.3))}
    table = RangeTable(model_name="m", model_sha256="0" * 64, num_samples=1, data_source="t", ranges=ranges)
    cache = cache_from_ranges(table, tensorrt_header("10.3.0"))
    text = format_cache(cache)
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    again = parse_cache(text)
    assert again == cache and format_cache(again) == text
    for name, rng in ranges.items():  # big-endian float32 of amax / 127, written independently
        assert struct.unpack(">f", bytes.fromhex(text.split(f"{name}: ")[1][:8]))[0] == np.float32(rng.amax / 127)


@pytest.mark.parametrize(("text", "match"), [
    ("", "empty"),
    ("TRT-1-X\nbad line\n", "line 2"),
    ("TRT-1-X\nx: 3c01020\n", "line 2"),
    ("TRT-1-X\nx: 3c010204\nx: 3c010204\n", "twice"),
    ("garbage\nx: 3c010204\n", "line 1"),
])
def test_bad_cache_text_names_the_line(text: str, match: str) -> None:
    with pytest.raises(CalibrationError, match=match):
        parse_cache(text)


def test_bad_header_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"10\.3\.0"):
        tensorrt_header("10.3")
    with pytest.raises(ConfigError, match="known"):
        tensorrt_header("10.3.0", "Entropy")
    with pytest.raises(ConfigError, match="cannot be written"):
        CalibrationCache(header="TRT-100300-EntropyCalibration2", scales={"a\nb": np.float32(1.0)})
