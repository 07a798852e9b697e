"""Calibration stage: streaming observers with serializable, mergeable state.

An *observer* collects; a *range method* (calib.methods) decides. Each observer here takes the valid rows
of one tensor for one batch (padding already excluded, shape [rows, D] with D the last axis), keeps a small
state, merges with another observer of the same kind, and round-trips through ``state()``/``from_state()``
as plain NumPy arrays (the checkpoint format).

* :class:`MinMaxObserver`    signed min, max and count (abs-max)
* :class:`HistogramObserver` the TensorRT |x| histogram (calib.histogram)
* :class:`DimRangeObserver`  per last-axis index min and max: per-channel amax and PEG ranges r_j
* :class:`TokenObserver`     per token id: occurrences, max and sum of the row-wise max|x| (outliers by token)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError
from calib.histogram import DEFAULT_NUM_BINS, AbsHistogram

State = dict[str, npt.NDArray[np.generic]]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass
class MinMaxObserver:
    """Running signed minimum and maximum of finite values."""

    minimum: float = math.inf
    maximum: float = -math.inf
    count: int = 0

    def update(self, rows: F32, minimum: float | None = None, maximum: float | None = None) -> None:
        if rows.size == 0:
            return
        lo = float(rows.min()) if minimum is None else minimum
        hi = float(rows.max()) if maximum is None else maximum
        self.minimum = min(self.minimum, lo)
        self.maximum = max(self.maximum, hi)
        self.count += int(rows.size)

    def merge(self, other: MinMaxObserver) -> MinMaxObserver:
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)
        self.count += other.count
        return self

    @property
    def abs_max(self) -> float:
        if self.count == 0:
            return 0.0
        return max(abs(self.minimum), abs(self.maximum))

    def state(self) -> State:
        return {"minmax": np.array([self.minimum, self.maximum], dtype=np.float64),
                "count": np.asarray(self.count, dtype=np.int64)}

    @classmethod
    def from_state(cls, state: State) -> MinMaxObserver:
        lo, hi = (float(v) for v in np.asarray(state["minmax"], dtype=np.float64))
        return cls(minimum=lo, maximum=hi, count=int(state["count"]))


@dataclass
class HistogramObserver:
    """|x| histogram, 2048 bins by default, range grown as TensorRT does (width fixed by the first batch)."""

    histogram: AbsHistogram = field(default_factory=AbsHistogram)

    @classmethod
    def with_bins(cls, num_bins: int = DEFAULT_NUM_BINS, bin_width: float = 0.0) -> HistogramObserver:
        return cls(AbsHistogram(num_bins=num_bins, bin_width=bin_width))

    def update(self, rows: F32, abs_max: float | None = None) -> None:
        self.histogram.update(np.abs(rows), abs_max)

    def update_abs(self, abs_rows: F32, abs_max: float | None = None) -> None:
        """Like :meth:`update` for values already made non-negative (``abs_rows`` is overwritten)."""
        self.histogram.update(abs_rows, abs_max)

    def merge(self, other: HistogramObserver) -> HistogramObserver:
        self.histogram.merge(other.histogram)
        return self

    def state(self) -> State:
        return self.histogram.state()

    @classmethod
    def from_state(cls, state: State) -> HistogramObserver:
        return cls(AbsHistogram.from_state(state))


@dataclass
class DimRangeObserver:
    """Per last-axis index min and max over all other axes (tokens, batch, heads)."""

    dim_min: F64 | None = None
    dim_max: F64 | None = None

    def update(self, rows: F32, dim_min: F32 | None = None, dim_max: F32 | None = None) -> None:
        if rows.shape[0] == 0:
            return
        lo = (rows.min(axis=0) if dim_min is None else dim_min).astype(np.float64)
        hi = (rows.max(axis=0) if dim_max is None else dim_max).astype(np.float64)
        self._fold(lo, hi)

    def _fold(self, lo: F64, hi: F64) -> None:
        if self.dim_min is None or self.dim_max is None:
            self.dim_min, self.dim_max = lo.copy(), hi.copy()
            return
        if lo.shape != self.dim_min.shape:
            raise CalibrationError(
                f"last axis changed from {self.dim_min.shape[0]} to {lo.shape[0]} between batches; "
                "per-dimension statistics need a fixed last axis"
            )
        np.minimum(self.dim_min, lo, out=self.dim_min)
        np.maximum(self.dim_max, hi, out=self.dim_max)

    def merge(self, other: DimRangeObserver) -> DimRangeObserver:
        if other.dim_min is not None and other.dim_max is not None:
            self._fold(other.dim_min, other.dim_max)
        return self

    @property
    def channel_amax(self) -> F64 | None:
        """Per-channel max|x| (one value per index of the last axis)."""
        if self.dim_min is None or self.dim_max is None:
            return None
        return np.maximum(np.abs(self.dim_min), np.abs(self.dim_max))

    def state(self) -> State:
        if self.dim_min is None or self.dim_max is None:
            return {}
        return {"dim_min": self.dim_min.copy(), "dim_max": self.dim_max.copy()}

    @classmethod
    def from_state(cls, state: State) -> DimRangeObserver:
        if "dim_min" not in state:
            return cls()
        return cls(np.asarray(state["dim_min"], dtype=np.float64).copy(),
                   np.asarray(state["dim_max"], dtype=np.float64).copy())


@dataclass
class TokenObserver:
    """Per token id: rows seen, max and sum of the row-wise max|x| (which tokens carry the outliers).

    Dense arrays indexed by token id (grown to the largest id seen); the public views and the state list
    only the ids that occurred.
    """

    dense_counts: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dense_max: F64 = field(default_factory=lambda: np.zeros(0, dtype=np.float64))
    dense_sum: F64 = field(default_factory=lambda: np.zeros(0, dtype=np.float64))

    def _ensure(self, size: int) -> None:
        if size > self.dense_counts.size:
            grow = size - self.dense_counts.size
            self.dense_counts = np.concatenate([self.dense_counts, np.zeros(grow, dtype=np.int64)])
            self.dense_max = np.concatenate([self.dense_max, np.zeros(grow, dtype=np.float64)])
            self.dense_sum = np.concatenate([self.dense_sum, np.zeros(grow, dtype=np.float64)])

    def update_rows(self, row_abs_max: F32 | F64, ids: I64) -> None:
        """Fold one batch: ``row_abs_max[r]`` is max|x| of row r, ``ids[r]`` its token id."""
        if ids.size == 0:
            return
        ids = ids.astype(np.int64, copy=False)
        if int(ids.min()) < 0:
            raise CalibrationError(f"token ids must be non-negative, got {int(ids.min())}")
        self._ensure(int(ids.max()) + 1)
        values = row_abs_max.astype(np.float64, copy=False)
        n = self.dense_counts.size
        self.dense_counts += np.bincount(ids, minlength=n)
        self.dense_sum += np.bincount(ids, weights=values, minlength=n)
        np.maximum.at(self.dense_max, ids, values)

    def merge(self, other: TokenObserver) -> TokenObserver:
        self._ensure(other.dense_counts.size)
        n = other.dense_counts.size
        self.dense_counts[:n] += other.dense_counts
        self.dense_sum[:n] += other.dense_sum
        np.maximum(self.dense_max[:n], other.dense_max, out=self.dense_max[:n])
        return self

    @property
    def token_ids(self) -> I64:
        """Ids that occurred, ascending; ``counts``, ``max_abs`` and ``sum_abs`` align with them."""
        ids: I64 = np.nonzero(self.dense_counts)[0].astype(np.int64)
        return ids

    @property
    def counts(self) -> I64:
        return self.dense_counts[self.token_ids]

    @property
    def max_abs(self) -> F64:
        return self.dense_max[self.token_ids]

    @property
    def sum_abs(self) -> F64:
        return self.dense_sum[self.token_ids]

    def state(self) -> State:
        return {"token_ids": self.token_ids, "token_counts": self.counts,
                "token_max_abs": self.max_abs, "token_sum_abs": self.sum_abs}

    @classmethod
    def from_state(cls, state: State) -> TokenObserver:
        ids = np.asarray(state["token_ids"], dtype=np.int64)
        observer = cls()
        observer._ensure(int(ids.max()) + 1 if ids.size else 0)
        observer.dense_counts[ids] = np.asarray(state["token_counts"], dtype=np.int64)
        observer.dense_max[ids] = np.asarray(state["token_max_abs"], dtype=np.float64)
        observer.dense_sum[ids] = np.asarray(state["token_sum_abs"], dtype=np.float64)
        return observer
