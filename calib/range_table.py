"""Calibration stage: the RangeTable, a view of Statistics for people and tools (``ranges.json``).

Per tensor: the symmetric ``amax`` one range method decided (scale = amax / 127), the observed min and max,
and per-dimension statistics along the last axis where it is a feature axis. Planning does not read it:
every recipe decides its own ranges from the Statistics (calib.statistics); ``ranges.json`` and TensorRT's
``calibration.cache`` (calib.cache) record what one method gives, for inspection and for TensorRT's
implicit-INT8 path.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum

from calib.errors import CalibrationError, suggest
from calib.schema import Schema, decode_json, to_json

RANGE_TABLE_VERSION = 2


class RangeMethod(StrEnum):
    """How a range is decided from observed statistics."""

    MAX = "max"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"  # TensorRT EntropyCalibration2: KL divergence, |x| histogram onto 128 levels
    MSE = "mse"


class TensorRange(Schema, frozen=True, kw_only=True):
    """The decided range of one tensor and the statistics it came from."""

    tensor: str
    amax: float  # symmetric per-tensor range: scale = amax / 127
    method: RangeMethod
    percentile: float | None = None  # the percentile used when method is PERCENTILE
    observed_min: float  # smallest finite value seen (padding excluded)
    observed_max: float  # largest finite value seen
    channel_amax: tuple[float, ...] | None = None  # per last-axis index max|x|
    dim_min: tuple[float, ...] | None = None  # per last-axis index min
    dim_max: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (self.amax > 0.0) or self.amax != self.amax or self.amax == float("inf"):
            raise CalibrationError(f"tensor {self.tensor!r}: range amax={self.amax!r} is not a finite positive number")

    @property
    def scale(self) -> float:
        """The INT8 scale amax / 127 (float32 semantics are applied at lowering)."""
        return self.amax / 127.0


class RangeTable(Schema, frozen=True, kw_only=True):
    """Ranges of every calibrated tensor of one model, keyed by ONNX tensor name."""

    version: int = RANGE_TABLE_VERSION
    model_name: str
    model_sha256: str  # hash of the calibrated (unquantized) ONNX model
    num_samples: int
    data_source: str  # e.g. "vader:512" or a file path
    ranges: dict[str, TensorRange]

    def __post_init__(self) -> None:
        for name, rng in self.ranges.items():
            if name != rng.tensor:
                raise CalibrationError(f"range table key {name!r} does not match its tensor {rng.tensor!r}")

    def __contains__(self, name: object) -> bool:
        return name in self.ranges

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.ranges))

    def get(self, name: str) -> TensorRange:
        """The range of tensor ``name``; a clear error with close matches if it was not calibrated."""
        try:
            return self.ranges[name]
        except KeyError:
            raise CalibrationError(f"no calibrated range for tensor {name!r}{suggest(name, self.ranges)}") from None

    def to_json(self) -> str:
        return to_json(self)

    @classmethod
    def from_json(cls, text: str) -> RangeTable:
        return decode_json(text, cls, "RangeTable", version=RANGE_TABLE_VERSION)
