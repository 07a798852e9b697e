"""Calibration stage: range methods applied to Statistics (pure functions, chosen at plan time).

* max         amax = max(|min|, |max|)
* percentile  the upper edge of the |x|-histogram bin where the CDF reaches p, capped at max|x|
* entropy     TensorRT EntropyCalibration2 (KL divergence onto 128 levels), calib.methods.entropy_bin
* mse         the histogram bin centre that minimises the expected quantize-dequantize squared error

One Statistics serves every method and every recipe: nothing here runs the model.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

from calib import methods
from calib.errors import CalibrationError, ConfigError
from calib.range_table import RangeMethod, RangeTable, TensorRange
from calib.schema import Schema
from calib.statistics import Statistics, TensorStatistics

_HISTOGRAM_SEARCHES = (RangeMethod.ENTROPY, RangeMethod.MSE)  # methods that score every candidate threshold


class RangeSpec(Schema, frozen=True, kw_only=True):
    """A range method and its parameter."""

    method: RangeMethod
    percentile: float | None = None  # required for PERCENTILE (e.g. 99.9, 99.99, 99.999)

    def __post_init__(self) -> None:
        if self.method == RangeMethod.PERCENTILE:
            if self.percentile is None or not 0.0 < self.percentile <= 100.0:
                raise ConfigError(f"method percentile needs a percentile in (0, 100], got {self.percentile!r}")
        elif self.percentile is not None:
            raise ConfigError(f"a percentile is only used with method percentile, not {self.method.value!r}")

    @property
    def label(self) -> str:
        """``max``, ``entropy``, ``mse`` or ``percentile:99.99``."""
        return self.method.value if self.percentile is None else f"{self.method.value}:{self.percentile:g}"


def tensor_amax(stats: TensorStatistics, spec: RangeSpec) -> float:
    """The symmetric per-tensor amax that ``spec`` decides from one tensor's statistics."""
    if stats.minmax.count == 0:
        raise CalibrationError(f"tensor {stats.tensor!r}: no values were observed (every position was padding "
                               "or a mask value)")
    abs_max = stats.minmax.abs_max
    if spec.method == RangeMethod.MAX:
        return methods.amax_max(stats.minmax.minimum, stats.minmax.maximum)
    hist = stats.get("histogram").histogram
    try:
        if spec.method == RangeMethod.PERCENTILE:
            assert spec.percentile is not None
            return methods.amax_percentile(hist.counts, hist.bin_width, spec.percentile, abs_max)
        # the last bin may reach past max|x| (the range grows in whole bins): never exceed what was observed
        if spec.method == RangeMethod.ENTROPY:
            return min(methods.amax_entropy(hist.counts, hist.bin_width), abs_max)
        return min(methods.amax_mse(hist.counts, hist.bin_width), abs_max)
    except CalibrationError as exc:
        raise CalibrationError(f"tensor {stats.tensor!r}: {exc}") from exc


def tensor_range(stats: TensorStatistics, spec: RangeSpec) -> TensorRange:
    """The TensorRange of one tensor under ``spec`` (with its per-dimension statistics where they exist)."""
    amax = tensor_amax(stats, spec)
    dims = stats.dims
    dim_min = dim_max = channel = None
    if dims is not None and dims.dim_min is not None and dims.dim_max is not None:
        dim_min, dim_max = tuple(float(v) for v in dims.dim_min), tuple(float(v) for v in dims.dim_max)
        channel = tuple(float(v) for v in dims.channel_amax) if dims.channel_amax is not None else None
    if not math.isfinite(amax):
        raise CalibrationError(f"tensor {stats.tensor!r}: range {amax!r} is not finite")
    return TensorRange(tensor=stats.tensor, amax=amax, method=spec.method, percentile=spec.percentile,
                       observed_min=stats.minmax.minimum, observed_max=stats.minmax.maximum,
                       channel_amax=channel, dim_min=dim_min, dim_max=dim_max)


def range_table(statistics: Statistics, spec: RangeSpec, *, model_name: str) -> RangeTable:
    """The RangeTable view of ``statistics`` under one range method (tensors decided on one thread per core: the
    histogram methods' loops release the GIL)."""
    names = list(statistics.tensors)
    workers = max(1, min(2, os.cpu_count() or 1)) if spec.method in _HISTOGRAM_SEARCHES else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        ranges = list(pool.map(lambda name: tensor_range(statistics.tensors[name], spec), names))
    return RangeTable(model_name=model_name, model_sha256=statistics.meta.model_sha256,
                      num_samples=statistics.samples, data_source=statistics.meta.data_source,
                      ranges=dict(zip(names, ranges, strict=True)))
