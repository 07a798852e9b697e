"""Calibration stage: the RangeTable artifact (per tensor: chosen range, method, granularity, statistics).

The RangeTable is what calibration hands to planning and lowering. Ranges are symmetric ``amax`` values
(scale = amax / 127, DESIGN.md section 3); per-dimension statistics along the last axis are kept for the
per-embedding-group (PEG) rewrite and the outlier report.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from calib.artifact_io import canonical_json, versioned_object
from calib.errors import CalibrationError, ConfigError, suggest

RANGE_TABLE_VERSION = 1


class RangeMethod(StrEnum):
    """How a range was decided from observed statistics."""

    MAX = "max"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"  # TensorRT EntropyCalibration2, 2048 bins -> 128 levels
    MSE = "mse"
    FIXED = "fixed"  # a range known without calibration (softmax output: 1.0)


class Granularity(StrEnum):
    TENSOR = "tensor"
    CHANNEL = "channel"  # one amax per index of the last axis
    GROUP = "group"  # per embedding group (PEG)


@dataclass(frozen=True, kw_only=True)
class TensorRange:
    """The decided range of one tensor and the statistics it came from."""

    tensor: str
    amax: float  # symmetric per-tensor range actually used: scale = amax / 127
    method: RangeMethod
    granularity: Granularity = Granularity.TENSOR
    observed_min: float  # smallest finite value seen (padding excluded)
    observed_max: float  # largest finite value seen
    percentile: float | None = None  # the percentile used when method is PERCENTILE
    channel_amax: tuple[float, ...] | None = None  # per last-axis index amax (CHANNEL/GROUP, outlier report)
    dim_min: tuple[float, ...] | None = None  # per last-axis index min (PEG ranges r_j = max - min)
    dim_max: tuple[float, ...] | None = None
    num_groups: int | None = None  # GROUP granularity: K groups over the range-sorted dims (calib.methods.peg_groups)

    def __post_init__(self) -> None:
        if not (self.amax > 0.0) or self.amax != self.amax or self.amax == float("inf"):
            raise CalibrationError(
                f"tensor {self.tensor!r}: range amax={self.amax!r} is not a finite positive number"
            )

    @property
    def scale(self) -> float:
        """The INT8 scale amax / 127 (float32 semantics are applied at lowering)."""
        return self.amax / 127.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "amax": self.amax,
            "method": self.method.value,
            "granularity": self.granularity.value,
            "observed_min": self.observed_min,
            "observed_max": self.observed_max,
            "percentile": self.percentile,
            "channel_amax": None if self.channel_amax is None else list(self.channel_amax),
            "dim_min": None if self.dim_min is None else list(self.dim_min),
            "dim_max": None if self.dim_max is None else list(self.dim_max),
            "num_groups": self.num_groups,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorRange:
        def _tuple(key: str) -> tuple[float, ...] | None:
            value = data.get(key)
            return None if value is None else tuple(float(v) for v in value)

        return cls(
            tensor=str(data["tensor"]),
            amax=float(data["amax"]),
            method=RangeMethod(data["method"]),
            granularity=Granularity(data.get("granularity", "tensor")),
            observed_min=float(data["observed_min"]),
            observed_max=float(data["observed_max"]),
            percentile=None if data.get("percentile") is None else float(data["percentile"]),
            channel_amax=_tuple("channel_amax"),
            dim_min=_tuple("dim_min"),
            dim_max=_tuple("dim_max"),
            num_groups=None if data.get("num_groups") is None else int(data["num_groups"]),
        )


@dataclass(frozen=True, kw_only=True)
class RangeTable:
    """Ranges of every calibrated tensor of one model, keyed by ONNX tensor name."""

    model_name: str
    model_sha256: str  # hash of the calibrated (unquantized) ONNX model
    num_samples: int
    data_source: str  # e.g. "vader:movie" or a file path
    ranges: Mapping[str, TensorRange]
    version: int = field(default=RANGE_TABLE_VERSION)

    def __post_init__(self) -> None:
        for name, rng in self.ranges.items():
            if name != rng.tensor:
                raise ConfigError(f"range table key {name!r} does not match its tensor {rng.tensor!r}")

    def __contains__(self, name: object) -> bool:
        return name in self.ranges

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.ranges))

    def get(self, name: str) -> TensorRange:
        """The range of tensor ``name``; a clear error with close matches if it was not calibrated."""
        try:
            return self.ranges[name]
        except KeyError:
            raise CalibrationError(
                f"no calibrated range for tensor {name!r}{suggest(name, self.ranges)}"
            ) from None

    def missing(self, names: list[str]) -> list[str]:
        """The subset of ``names`` this table has no range for."""
        return [n for n in names if n not in self.ranges]

    def to_json(self) -> str:
        data = {
            "version": self.version,
            "model_name": self.model_name,
            "model_sha256": self.model_sha256,
            "num_samples": self.num_samples,
            "data_source": self.data_source,
            "ranges": {name: self.ranges[name].to_dict() for name in sorted(self.ranges)},
        }
        return canonical_json(data)

    @classmethod
    def from_json(cls, text: str) -> RangeTable:
        data = versioned_object(text, "RangeTable", RANGE_TABLE_VERSION)
        return cls(
            model_name=str(data["model_name"]),
            model_sha256=str(data["model_sha256"]),
            num_samples=int(data["num_samples"]),
            data_source=str(data["data_source"]),
            ranges={name: TensorRange.from_dict(r) for name, r in data["ranges"].items()},
        )
