"""Calibration stage: TensorRT calibration cache text format, read and written (the format TensorRT's
IInt8Calibrator.read_calibration_cache takes).

    TRT-100300-EntropyCalibration2          header: TRT-<version>-<algorithm>
    input_ids: 3c010204                     <tensor name>: <big-endian IEEE-754 float32 scale = amax / 127>

Scales are kept as float32 values, so ``format_cache(parse_cache(text)) == text`` byte for byte and
``parse_cache(format_cache(cache)) == cache``. A tensor name may contain ``": "``; rows split on the last one.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from calib.errors import CalibrationError, ConfigError
from calib.quant import scale_from_amax
from calib.range_table import RangeTable

DEFAULT_HEADER = "TRT-100300-EntropyCalibration2"  # TensorRT 10.3.0, entropy calibrator 2
ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_HEX = re.compile(r"^[0-9a-f]{8}$")


@dataclass(frozen=True, kw_only=True)
class CalibrationCache:
    """A TensorRT calibration cache: header and per-tensor float32 scales, in file order."""

    header: str
    scales: Mapping[str, np.float32]

    def __post_init__(self) -> None:
        match = _HEADER.match(self.header)
        if match is None:
            raise ConfigError(f"calibration cache header {self.header!r} is not of the form "
                              f"TRT-<version>-<algorithm>, e.g. {DEFAULT_HEADER!r}")
        for name, scale in self.scales.items():
            if not name or "\n" in name or "\r" in name:
                raise ConfigError(f"tensor name {name!r} cannot be written to a calibration cache")
            if not (np.isfinite(scale) and scale > 0):
                raise CalibrationError(f"tensor {name!r}: scale {scale!r} must be finite and positive")

    @property
    def algorithm(self) -> str:
        match = _HEADER.match(self.header)
        assert match is not None
        return match.group(2)

    def amax(self, name: str) -> float:
        """amax = scale * 127 (float64)."""
        return float(self.scales[name]) * 127.0


def tensorrt_header(version: str = "10.3.0", algorithm: str = "EntropyCalibration2") -> str:
    """``TRT-<major*10000 + minor*100 + patch>-<algorithm>`` (TensorRT 10+ encoding, e.g. 10.3.0 -> 100300)."""
    parts = version.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ConfigError(f"TensorRT version {version!r} must look like 10.3.0")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"calibration algorithm {algorithm!r} unknown; known: {', '.join(ALGORITHMS)}")
    major, minor, patch = (int(p) for p in parts)
    return f"TRT-{major * 10000 + minor * 100 + patch}-{algorithm}"


def cache_from_ranges(table: RangeTable, header: str = DEFAULT_HEADER) -> CalibrationCache:
    """Per-tensor scales ``float32(amax / 127)`` of every range, sorted by tensor name."""
    return CalibrationCache(header=header, scales={name: scale_from_amax(table.get(name).amax) for name in table})


def format_cache(cache: CalibrationCache) -> str:
    """The cache file text (header line, then one ``name: hex`` line per tensor, trailing newline)."""
    rows = [f"{name}: {struct.pack('>f', float(scale)).hex()}" for name, scale in cache.scales.items()]
    return "\n".join([cache.header, *rows]) + "\n"


def parse_cache(text: str) -> CalibrationCache:
    """Read a cache file's text; errors name the bad line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise CalibrationError("calibration cache is empty")
    scales: dict[str, np.float32] = {}
    for number, row in enumerate(lines[1:], start=2):
        name, sep, hex_scale = row.rpartition(": ")
        if not sep or not name or _HEX.match(hex_scale) is None:
            raise CalibrationError(f"calibration cache line {number}: expected '<tensor>: <8 hex digits>', "
                                   f"got {row!r}")
        if name in scales:
            raise CalibrationError(f"calibration cache line {number}: tensor {name!r} appears twice")
        scales[name] = np.frombuffer(bytes.fromhex(hex_scale), dtype=">f4")[0].astype(np.float32)
    try:
        return CalibrationCache(header=lines[0], scales=scales)
    except ConfigError as exc:
        raise CalibrationError(f"calibration cache line 1: {exc}") from exc
