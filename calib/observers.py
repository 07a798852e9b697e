"""Calibration stage: streaming observers with serializable states that merge exactly.

An *observer* collects; a *range method* (calib.methods, calib.ranges) decides. Each observer kind here
folds one batch of one tensor's valid rows (a :class:`RowsView`: padding already excluded, shape [rows, D]
with D the last axis), keeps a small state, merges with another observer of the same kind, and round-trips
through ``state()``/``from_state()`` as plain NumPy arrays. Every merge is exact: integer counts, minima
and maxima, histograms on a declared grid (calib.histogram). So the statistics of data shards merged in
any grouping equal one pass over all the data, bit for bit.

* :class:`MinMaxObserver`    signed min, max and count (abs-max)
* :class:`HistogramObserver` the |x| histogram on a power-of-two grid (calib.histogram)
* :class:`DimRangeObserver`  per last-axis index min and max: per-channel amax and PEG ranges r_j
* :class:`TokenObserver`     per token id: occurrences and the largest row-wise max|x| (outliers by token)

New kinds implement :class:`Observer` and are listed in :data:`OBSERVER_KINDS`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, NamedTuple, Protocol, Self

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError
from calib.hessian_observer import HessianKind
from calib.histogram import DEFAULT_BINS, AbsHistogram
from calib.sparq_observer import SparqPairObserver

State = dict[str, npt.NDArray[np.generic]]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

MASK_SENTINEL = -1e30  # values at or below this are additive-mask sentinels (float32 min, -inf)


class Scratch:
    """Reusable buffers of one folding thread.

    A fresh multi-megabyte array per tensor and batch costs a page fault per 4 KiB on first touch; reusing two
    buffers (the |x| values and the histogram's bin indices) keeps the fold near memory bandwidth.
    """

    def __init__(self) -> None:
        self._f32: F32 = np.empty(0, dtype=np.float32)
        self._intp: npt.NDArray[np.intp] = np.empty(0, dtype=np.intp)

    def f32(self, size: int) -> F32:
        if self._f32.size < size:
            self._f32 = np.empty(size + size // 4, dtype=np.float32)
        return self._f32[:size]

    def intp(self, size: int) -> npt.NDArray[np.intp]:
        if self._intp.size < size:
            self._intp = np.empty(size + size // 4, dtype=np.intp)
        return self._intp[:size]


@dataclass(frozen=True)
class TokenRows:
    """Row maxima already reduced per token position: ``abs_max[r]`` is max|x| over ``repeats`` rows of id
    ``ids[r]`` (e.g. the heads of an attention operand [B, H, S, d], reduced per (b, s))."""

    abs_max: F32
    ids: I64
    repeats: int


_BLOCK = 512  # elements per block row of the blocked column reduction (see :func:`column_reduce`)


def column_reduce(rows: F32, ufunc: np.ufunc) -> F32:
    """``ufunc.reduce(rows, axis=0)`` for rows [N, D], blocked when D is short.

    NumPy reduces axis 0 one row at a time; with D = 32 (a head dimension) that is four times slower than
    reducing k rows at once as one block row of k*D and folding the k partial results (min and max are exact,
    so the grouping does not change the result):

        rows [N, D] -> [N/k, k*D] --reduce axis 0--> [k*D] -> [k, D] --reduce axis 0--> [D]   (+ the N % k tail)
    """
    n, d = rows.shape
    k = _BLOCK // max(d, 1)
    if k < 2 or n < 2 * k or not rows.flags.c_contiguous:
        out: F32 = ufunc.reduce(rows, axis=0)
        return out
    m = (n // k) * k
    partial = ufunc.reduce(rows[:m].reshape(-1, k * d), axis=0).reshape(k, d)
    result: F32 = ufunc.reduce(partial, axis=0)
    if m < n:
        ufunc(result, ufunc.reduce(rows[m:], axis=0), out=result)
    return result


class FirstRows(NamedTuple):
    """The first-token row [M, D] of each sample of a batch and the samples' global ids [M] (unique per pass)."""

    rows: F32
    ids: I64


class RowsView:
    """One batch of one tensor: valid rows [N, D] (float32) and what several observers derive from them.

    ``sentinel`` marks additive attention-mask values (<= -1e30 or -inf) that every statistic excludes; the
    derived values are computed once per batch, whichever observers ask for them. ``scratch`` (optional)
    lends reusable buffers; ``token_rows`` (optional, never with a sentinel) gives the token observer its row
    maxima already reduced; ``first_rows`` (optional) holds each sample's first-token row with its global sample
    id (kept by the Hessian observer; calib.layout.first_token_rows).
    """

    def __init__(self, rows: F32, row_ids: I64 | None = None, sentinel: npt.NDArray[np.bool_] | None = None, *,
                 scratch: Scratch | None = None, token_rows: TokenRows | None = None,
                 first_rows: FirstRows | None = None) -> None:
        self.rows = rows
        self.first_rows = first_rows
        self.row_ids = row_ids
        self.sentinel = sentinel
        self.scratch = scratch
        self.token_rows = token_rows if sentinel is None else None

    @cached_property
    def dim_range(self) -> tuple[F32, F32]:
        """Per last-axis index (min, max) over the non-sentinel rows (+inf/-inf where a column is all mask)."""
        if self.sentinel is None:
            return column_reduce(self.rows, np.minimum), column_reduce(self.rows, np.maximum)
        lo = np.where(self.sentinel, np.inf, self.rows).min(axis=0).astype(np.float32)
        hi = np.where(self.sentinel, -np.inf, self.rows).max(axis=0).astype(np.float32)
        return lo, hi

    @cached_property
    def values(self) -> F32:
        """Every non-sentinel value, flattened (the rows themselves when there is no sentinel)."""
        return self.rows if self.sentinel is None else self.rows[~self.sentinel]

    @cached_property
    def bounds(self) -> tuple[float, float]:
        """(min, max) of the non-sentinel values."""
        if self.rows.ndim == 2 and self.rows.shape[1] > 1 and self.sentinel is None:
            lo, hi = self.dim_range
            return float(lo.min()), float(hi.max())
        values = self.values
        return (float(values.min()), float(values.max())) if values.size else (math.inf, -math.inf)

    @cached_property
    def abs_values(self) -> F32:
        """|x| of :attr:`values` (a fresh array, or the scratch buffer, that :meth:`take_abs_values` hands over)."""
        values = self.values
        if self.scratch is None:
            return np.abs(values)
        out = self.scratch.f32(values.size).reshape(values.shape)
        return np.abs(values, out=out)

    def take_abs_values(self) -> F32:
        """:attr:`abs_values` for a consumer that may overwrite them (the histogram, which runs last)."""
        values = self.abs_values
        del self.__dict__["abs_values"]  # a later reader recomputes them
        return values

    @cached_property
    def row_abs_max(self) -> F32:
        """max|x| of each row (sentinels count as 0)."""
        if self.sentinel is None:
            out: F32 = self.abs_values.max(axis=1)
            return out
        masked: F32 = np.where(self.sentinel, 0.0, np.abs(self.rows)).max(axis=1).astype(np.float32)
        return masked


class Observer(Protocol):
    """What every observer kind provides (see the module docstring)."""

    kind: ClassVar[str]

    def update(self, view: RowsView) -> None: ...

    def merge(self, other: Self) -> Self: ...

    def state(self) -> State: ...

    @classmethod
    def from_state(cls, state: State) -> Self: ...


@dataclass
class MinMaxObserver:
    """Running signed minimum and maximum of finite values, and how many values were seen."""

    kind: ClassVar[str] = "minmax"
    minimum: float = math.inf
    maximum: float = -math.inf
    count: int = 0

    def update(self, view: RowsView) -> None:
        values = view.values
        if values.size == 0:
            return
        lo, hi = view.bounds
        self.minimum = min(self.minimum, lo)
        self.maximum = max(self.maximum, hi)
        self.count += int(values.size)

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
    """|x| histogram on the declared power-of-two grid (calib.histogram)."""

    kind: ClassVar[str] = "histogram"
    histogram: AbsHistogram = field(default_factory=AbsHistogram)

    @classmethod
    def with_bins(cls, bins: int = DEFAULT_BINS) -> HistogramObserver:
        return cls(AbsHistogram(bins=bins))

    def update(self, view: RowsView) -> None:
        if view.values.size == 0:
            return
        lo, hi = view.bounds
        scratch = None if view.scratch is None else view.scratch.intp(view.values.size)
        self.histogram.update(view.take_abs_values(), max(-lo, hi), overwrite=True, scratch=scratch)

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

    kind: ClassVar[str] = "dims"
    dim_min: F64 | None = None
    dim_max: F64 | None = None

    def update(self, view: RowsView) -> None:
        if view.rows.shape[0] == 0:
            return
        lo, hi = view.dim_range
        self.update_ranges(lo.astype(np.float64), hi.astype(np.float64))

    def update_ranges(self, lo: F64, hi: F64) -> None:
        """Fold one batch's per-dimension minima and maxima."""
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
            self.update_ranges(other.dim_min, other.dim_max)
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
    """Per token id: rows seen and the largest row-wise max|x| (which tokens carry the outliers).

    Dense arrays indexed by token id (grown to the largest id seen); the public views and the state list
    only the ids that occurred.
    """

    kind: ClassVar[str] = "tokens"
    dense_counts: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dense_max: F64 = field(default_factory=lambda: np.zeros(0, dtype=np.float64))

    def reserve(self, size: int) -> None:
        """Grow the dense arrays to hold ids below ``size``."""
        if size > self.dense_counts.size:
            grow = size - self.dense_counts.size
            self.dense_counts = np.concatenate([self.dense_counts, np.zeros(grow, dtype=np.int64)])
            self.dense_max = np.concatenate([self.dense_max, np.zeros(grow, dtype=np.float64)])

    def update(self, view: RowsView) -> None:
        if view.token_rows is not None:
            rows = view.token_rows
            self.update_rows(rows.abs_max, rows.ids, repeats=rows.repeats)
        elif view.row_ids is not None:
            self.update_rows(view.row_abs_max, view.row_ids)

    def update_rows(self, row_abs_max: F32 | F64, ids: I64, *, repeats: int = 1) -> None:
        """Fold one batch: ``row_abs_max[r]`` is max|x| of row r (over ``repeats`` rows), ``ids[r]`` its token id."""
        if ids.size == 0:
            return
        ids = ids.astype(np.int64, copy=False)
        if int(ids.min()) < 0:
            raise CalibrationError(f"token ids must be non-negative, got {int(ids.min())}")
        self.reserve(int(ids.max()) + 1)
        counts = np.bincount(ids, minlength=self.dense_counts.size)
        self.dense_counts += counts if repeats == 1 else counts * repeats
        np.maximum.at(self.dense_max, ids, row_abs_max.astype(np.float64, copy=False))

    def merge(self, other: TokenObserver) -> TokenObserver:
        self.reserve(other.dense_counts.size)
        n = other.dense_counts.size
        self.dense_counts[:n] += other.dense_counts
        np.maximum(self.dense_max[:n], other.dense_max, out=self.dense_max[:n])
        return self

    @property
    def token_ids(self) -> I64:
        """Ids that occurred, ascending; ``counts`` and ``max_abs`` align with them."""
        ids: I64 = np.nonzero(self.dense_counts)[0].astype(np.int64)
        return ids

    @property
    def counts(self) -> I64:
        return self.dense_counts[self.token_ids]

    @property
    def max_abs(self) -> F64:
        return self.dense_max[self.token_ids]

    def state(self) -> State:
        return {"token_ids": self.token_ids, "token_counts": self.counts, "token_max_abs": self.max_abs}

    @classmethod
    def from_state(cls, state: State) -> TokenObserver:
        ids = np.asarray(state["token_ids"], dtype=np.int64)
        observer = cls()
        observer.reserve(int(ids.max()) + 1 if ids.size else 0)
        observer.dense_counts[ids] = np.asarray(state["token_counts"], dtype=np.int64)
        observer.dense_max[ids] = np.asarray(state["token_max_abs"], dtype=np.float64)
        return observer


# Every observer kind by name (the order observers see a batch: the histogram last, it may reuse buffers).
OBSERVER_KINDS: dict[str, type[Any]] = {
    MinMaxObserver.kind: MinMaxObserver,
    DimRangeObserver.kind: DimRangeObserver,
    TokenObserver.kind: TokenObserver,
    SparqPairObserver.kind: SparqPairObserver,  # vSPARQ pairs with a zero code (calib.sparq_observer)
    HessianKind.kind: HessianKind,  # X^T X of a GEMM input for OPTQ (calib.hessian_observer)
    HistogramObserver.kind: HistogramObserver,
}
