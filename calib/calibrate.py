"""Calibration stage: ``calibrate(model, feeds, tensors, method) -> RangeTable``.

Collect once (calib.collect), then decide ranges with any method (:func:`ranges_from_states`), so methods can
be compared on one collection pass. Per-tensor amax comes from the chosen method on the |x| histogram (or
the running max); per-channel and per-group ranges use the per-dimension max (histograms are per tensor).
Every range carries the per-last-axis-index ``dim_min``/``dim_max``/``channel_amax`` statistics when the
last axis is a feature axis.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from calib import methods
from calib.collect import Collection, CollectOptions, Feed, collect
from calib.errors import CalibrationError, ConfigError
from calib.range_table import Granularity, RangeMethod, RangeTable, TensorRange
from calib.tensor_stats import TensorStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RangeSpec:
    """How ranges are decided from collected statistics."""

    method: RangeMethod
    percentile: float | None = None  # required for PERCENTILE (e.g. 99.9, 99.99, 99.999)
    granularity: Granularity = Granularity.TENSOR
    num_groups: int | None = None  # required for GROUP (PEG K, e.g. 6)

    def __post_init__(self) -> None:
        if self.method == RangeMethod.FIXED:
            raise ConfigError("method 'fixed' is not a calibration method; use max, percentile, entropy or mse")
        if self.method == RangeMethod.PERCENTILE:
            if self.percentile is None or not 0.0 < self.percentile <= 100.0:
                raise ConfigError(f"method percentile needs --percentile in (0, 100], got {self.percentile!r}")
        elif self.percentile is not None:
            raise ConfigError(f"--percentile is only used with method percentile, not {self.method.value!r}")
        if self.granularity == Granularity.GROUP:
            if self.num_groups is None or self.num_groups < 1:
                raise ConfigError(f"granularity group needs a number of groups >= 1, got {self.num_groups!r}")
        elif self.num_groups is not None:
            raise ConfigError("a number of groups is only used with granularity group")


def tensor_amax(stats: TensorStats, spec: RangeSpec) -> float:
    """The per-tensor amax of ``spec.method`` from one tensor's statistics."""
    hist = stats.histogram.histogram
    try:
        if spec.method == RangeMethod.MAX:
            return methods.amax_max(stats.minmax.minimum, stats.minmax.maximum)
        if spec.method == RangeMethod.PERCENTILE:
            assert spec.percentile is not None
            return methods.amax_percentile(hist.counts, hist.bin_width, spec.percentile, stats.minmax.abs_max)
        # the last bin may reach past max|x| (the range grows in whole bins): never exceed what was observed
        if spec.method == RangeMethod.ENTROPY:
            return min(methods.amax_entropy(hist.counts, hist.bin_width), stats.minmax.abs_max)
        if spec.method == RangeMethod.MSE:
            return min(methods.amax_mse(hist.counts, hist.bin_width), stats.minmax.abs_max)
    except CalibrationError as exc:
        raise CalibrationError(f"tensor {stats.tensor!r}: {exc}") from exc
    raise ConfigError(f"range method {spec.method.value!r} cannot be computed from statistics")


def tensor_range(stats: TensorStats, spec: RangeSpec) -> TensorRange:
    """The TensorRange of one tensor under ``spec``."""
    if stats.minmax.count == 0:
        raise CalibrationError(f"tensor {stats.tensor!r}: no values were observed (every position was padding "
                               "or a mask value)")
    amax = tensor_amax(stats, spec)
    granularity, num_groups = spec.granularity, spec.num_groups
    dims = stats.dims
    dim_min = dim_max = channel = None
    if dims is not None and dims.dim_min is not None and dims.dim_max is not None:
        dim_min, dim_max = tuple(float(v) for v in dims.dim_min), tuple(float(v) for v in dims.dim_max)
        amax_c = dims.channel_amax
        assert amax_c is not None
        channel = tuple(float(v) for v in amax_c)
        if granularity == Granularity.GROUP and dims.dim_min.size % (num_groups or 1):
            logger.warning("tensor %r: %s groups do not divide its width %d; per-tensor range used",
                           stats.tensor, num_groups, dims.dim_min.size)
            granularity, num_groups = Granularity.TENSOR, None
    elif granularity != Granularity.TENSOR:
        logger.warning("tensor %r has no feature axis (its last axis is a token axis): per-tensor range used",
                       stats.tensor)
        granularity, num_groups = Granularity.TENSOR, None
    return TensorRange(
        tensor=stats.tensor, amax=amax, method=spec.method, granularity=granularity,
        observed_min=stats.minmax.minimum, observed_max=stats.minmax.maximum, percentile=spec.percentile,
        channel_amax=channel, dim_min=dim_min, dim_max=dim_max, num_groups=num_groups,
    )


def ranges_from_states(stats: Mapping[str, TensorStats], spec: RangeSpec | RangeMethod,
                       percentile: float | None = None) -> dict[str, TensorRange]:
    """Ranges of every tensor from collected statistics (collect once, decide with several methods)."""
    resolved = spec if isinstance(spec, RangeSpec) else RangeSpec(method=spec, percentile=percentile)
    return {name: tensor_range(stats[name], resolved) for name in stats}


def range_table(collection: Collection, spec: RangeSpec, *, model_name: str, data_source: str) -> RangeTable:
    """A RangeTable from a finished collection."""
    return RangeTable(model_name=model_name, model_sha256=collection.model_sha256, num_samples=collection.samples,
                      data_source=data_source, ranges=ranges_from_states(collection.stats, spec))


def model_name_of(model: onnx.ModelProto | Path) -> str:
    if isinstance(model, onnx.ModelProto):
        return model.graph.name or "model"
    return Path(model).stem


def calibrate(model: onnx.ModelProto | Path, feeds: Iterable[Feed], tensors: Sequence[str], method: RangeMethod,
              percentile: float | None = None, *, granularity: Granularity = Granularity.TENSOR,
              num_groups: int | None = None, options: CollectOptions | None = None) -> RangeTable:
    """Collect statistics of ``tensors`` over ``feeds`` and decide their ranges with ``method``."""
    spec = RangeSpec(method=RangeMethod(method), percentile=percentile, granularity=granularity,
                     num_groups=num_groups)  # validated before the expensive collection
    opts = options or CollectOptions()
    collection = collect(model, feeds, tensors, opts)
    return range_table(collection, spec, model_name=model_name_of(model), data_source=opts.data_source)
