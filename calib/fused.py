"""Calibration stage: the fused fold of one tensor into its default observers (compiled with Numba).

The reference fold (calib.fold.observe -> calib.observers) extracts the valid rows and lets each observer
reduce them with NumPy: some ten passes over every activation. Here one compiled pass reads the activation
in place, padding skipped by its row and column masks, and produces exactly the same observer states:

    per valid element:  per-column min and max        -> minmax (min, max, count), dims (column ranges)
                        per-row max|x|                -> tokens (row maxima by token id)
                        ceil(|x| / 2**e) counted       -> histogram, on the grid of the batches before
                        a non-finite flag              -> the batch takes the reference path instead

The histogram is counted on the grid the earlier batches fixed; when this batch's largest |x| widens the grid
(the first batch, and rarely later), a second pass counts it again on the new grid. Every result is a minimum,
a maximum or an integer count, so the order of the loops changes no bit, and the bin index is the reference's
float product (a power-of-two scaling, exact) and its ceiling. Batches with non-finite values or attention-mask
sentinels (rare: only mask-carrying tensors) and tensors with further observer kinds (the on-demand Hessian
and SPARQ passes) take the reference path, which names and counts them.

    layout                      x as [B, M, K]          row mask [B, M]          column mask [B, K]
    features last [B, S, D]     [1, B*S, D]             token positions          all (D features)
    key axis last [B, H, S, S]  [B, H*S, S]             query positions          key positions
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError
from calib.histogram import AbsHistogram, bin_factor
from calib.layout import TensorLayout
from calib.observers import MASK_SENTINEL, DimRangeObserver, HistogramObserver, MinMaxObserver, TokenObserver
from calib.statistics import TensorStatistics

F32 = npt.NDArray[np.float32]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]
Mask = npt.NDArray[np.bool_]

logger = logging.getLogger(__name__)

FUSED_KINDS = frozenset({"minmax", "dims", "tokens", "histogram"})
_kernels: dict[str, Any] = {}
_unusable: list[str] = []  # why Numba could not be imported
_warming: list[threading.Thread] = []


def _compile() -> dict[str, Any]:
    """The Numba kernels (calib.fused_kernels: compiled on first use, or loaded from Numba's disk cache); empty
    when Numba cannot be imported (logged once; every tensor then takes the reference path)."""
    if not _kernels and not _unusable:
        try:
            from calib import fused_kernels
        except ImportError as exc:
            _unusable.append(str(exc))
            logger.warning("Numba cannot be imported (%s): calibration folds with NumPy, more slowly", exc)
            return _kernels
        _kernels.update(features=fused_kernels.features, masked=fused_kernels.masked,
                        histogram=fused_kernels.histogram, tokens=fused_kernels.tokens)
    return _kernels


def warm_up() -> None:
    """Load the kernels (Numba's disk cache, or a compile on the first run) on a background thread, with the
    argument types the fold passes, so that a collector's first fold finds them ready."""
    if not _warming:
        _warming.append(threading.Thread(target=_exercise, name="fused-warm-up", daemon=True))
        _warming[0].start()


def _exercise() -> None:
    kernels = _compile()
    if not kernels:
        return
    x = np.zeros((1, 1, 4), dtype=np.float32)
    keep, lo, hi = np.ones((1, 1), dtype=bool), np.zeros(4, dtype=np.float32), np.zeros(4, dtype=np.float32)
    cols = np.ones((1, 4), dtype=bool)
    factor = np.float32(1.0)  # the grids of float32 activations (bin_factor's float64 is loaded when first met)
    for counted in (np.zeros(0, dtype=np.int64), np.zeros(6, dtype=np.int64)):
        kernels["features"](x[0], keep[0], lo, hi, np.zeros(1, dtype=np.uint32), factor, counted)
        kernels["masked"](x, keep, cols, lo, hi, factor, counted)
    kernels["histogram"](x, keep, cols, factor, np.zeros(6, dtype=np.int64))
    kernels["tokens"](np.zeros((1, 1, 1), dtype=np.float32), keep, np.zeros((1, 1), dtype=np.int64),
                      np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.float64), 1)


def available() -> bool:
    """True when Numba is installed (the reference path runs otherwise); it is imported only when first used."""
    return importlib.util.find_spec("numba") is not None


@dataclass
class BatchMasks:
    """One batch's attention mask [B, S] and the row and column masks derived from it, per layout and shape
    (shared by the tensors of the batch)."""

    mask: Mask | None
    _cache: dict[tuple[TensorLayout, tuple[int, ...]], tuple[Mask, Mask | None]] = field(default_factory=dict)
    _ones: dict[int, Mask] = field(default_factory=dict)
    _ids: tuple[I64, int] | None = None

    def every(self, width: int) -> Mask:
        """A [1, width] all-true column mask."""
        if width not in self._ones:
            self._ones[width] = np.ones((1, width), dtype=bool)
        return self._ones[width]

    def valid_ids(self, ids: npt.NDArray[Any]) -> tuple[I64, int] | None:
        """The batch's token ids as int64 [B, S] and the largest at a valid position (None: no valid position).

        Raises CalibrationError for a negative id at a valid position (as the token observer does)."""
        if self._ids is None and self.mask is not None and self.mask.any():
            valid = np.asarray(ids)[self.mask]
            if int(valid.min()) < 0:
                raise CalibrationError(f"token ids must be non-negative, got {int(valid.min())}")
            self._ids = np.ascontiguousarray(ids, dtype=np.int64), int(valid.max())
        return self._ids

    def get(self, layout: TensorLayout, shape: tuple[int, ...]) -> tuple[Mask, Mask | None]:
        """(rows [B, M], columns [B, K] or None when every column counts) for a tensor of ``shape``."""
        key = (layout, shape)
        if key not in self._cache:
            self._cache[key] = self._derive(layout, shape)
        return self._cache[key]

    def _derive(self, layout: TensorLayout, shape: tuple[int, ...]) -> tuple[Mask, Mask | None]:
        lead = shape[:-1]
        mask = self.mask
        if mask is None:
            return np.ones((1, math.prod(lead)), dtype=bool), None
        if layout.flattened:
            flat = mask.reshape((-1,) + (1,) * (len(lead) - 1))
            return np.ascontiguousarray(np.broadcast_to(flat, lead)).reshape(1, -1), None
        axes = [a for a in layout.token_axes if a not in (-1, len(shape) - 1)]
        keep = np.ones(lead, dtype=bool)
        for axis in axes:
            view = [1] * len(lead)
            view[0], view[axis] = mask.shape
            keep &= mask.reshape(view)
        if layout.has_dims:
            return keep.reshape(1, -1), None
        return keep.reshape(shape[0], -1), np.ascontiguousarray(mask)


def fusable(stats: TensorStatistics, layout: TensorLayout, x: npt.NDArray[Any], mask: Mask | None) -> bool:
    """Whether :func:`fold` handles this tensor (else the reference path folds it)."""
    if not stats.observers.keys() <= FUSED_KINDS or x.ndim < 2 or x.dtype != np.float32 or not x.flags.c_contiguous:
        return False
    if not _compile():
        return False
    if mask is None or not (layout.token_axes or layout.flattened):
        return True
    if layout.flattened:
        return bool(x.shape[0] == mask.size)
    return x.shape[0] == mask.shape[0] and all(x.shape[a] == mask.shape[1] for a in layout.token_axes)


def _grid(hist: HistogramObserver | None) -> tuple[Any, I64]:
    """The bin factor 2**-e of the histogram's current grid and zeroed counts [bins + 2] (empty: nothing to count
    yet, or no histogram). Slot 0 counts padding, slot c + 1 the values with ceil(|x| / 2**e) == c for c < bins,
    and the last slot c >= bins (exactly c == bins unless the batch widens the grid, which recounts)."""
    if hist is None or hist.histogram.exponent is None:
        return np.float32(1.0), np.zeros(0, dtype=np.int64)
    return bin_factor(hist.histogram.exponent), np.zeros(hist.histogram.bins + 2, dtype=np.int64)


def fold(stats: TensorStatistics, layout: TensorLayout, x: F32, masks: BatchMasks,
         ids: npt.NDArray[Any] | None) -> bool:
    """Fold one batch of tensor ``x`` into ``stats``; False (nothing changed) when the batch has non-finite values
    or mask sentinels, which the reference path then handles. Requires :func:`fusable`."""
    kernels = _compile()
    rows, cols = masks.get(layout, x.shape)
    hist: HistogramObserver | None = stats.observers.get("histogram")
    factor, counted = _grid(hist)
    lo = np.full(x.shape[-1], np.inf, dtype=np.float32)
    hi = np.full(x.shape[-1], -np.inf, dtype=np.float32)
    row_max = None
    if cols is None:
        x3 = x.reshape(1, -1, x.shape[-1])
        row_max = np.zeros(rows.shape[1], dtype=np.uint32)
        bad, kept, low, high = kernels["features"](x3[0], rows[0], lo, hi, row_max, factor, counted)
        size = kept * x.shape[-1]
        cols = masks.every(x.shape[-1])
    else:
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        bad, size, low, high = kernels["masked"](x3, rows, cols, lo, hi, factor, counted)
    if size == 0:
        return True
    low, high = float(low), float(high)
    if bad or low <= MASK_SENTINEL:
        return False
    _commit_ranges(stats, lo, hi, low, high, size)
    if row_max is not None and masks.mask is not None and ids is not None:
        _commit_tokens(stats, layout, row_max, masks, ids, x.shape)
    if hist is not None:
        _commit_histogram(hist.histogram, (x3, rows, cols), max(-low, high), size, counted)
    return True


def _commit_ranges(stats: TensorStatistics, lo: F32, hi: F32, low: float, high: float, size: int) -> None:
    minmax: MinMaxObserver | None = stats.observers.get("minmax")
    if minmax is not None:
        minmax.minimum, minmax.maximum = min(minmax.minimum, low), max(minmax.maximum, high)
        minmax.count += size
    dims: DimRangeObserver | None = stats.observers.get("dims")
    if dims is not None:
        dims.update_ranges(lo.astype(np.float64), hi.astype(np.float64))


def _commit_tokens(stats: TensorStatistics, layout: TensorLayout, row_max: U32, masks: BatchMasks,
                   ids: npt.NDArray[Any], shape: tuple[int, ...]) -> None:
    """Row maxima reduced over the lead axes other than batch and token (heads) to one per valid position."""
    tokens: TokenObserver | None = stats.observers.get("tokens")
    if tokens is None or len(layout.token_axes) != 1 or layout.flattened or masks.mask is None:
        return
    valid_ids = masks.valid_ids(ids)
    if valid_ids is None:
        return
    token = layout.token_axes[0]
    per_row = np.moveaxis(row_max.view(np.float32).reshape(shape[:-1]), token, -1)
    groups = per_row.reshape(shape[0], -1, shape[token])
    tokens.reserve(valid_ids[1] + 1)
    _compile()["tokens"](groups, masks.mask, valid_ids[0], tokens.dense_counts, tokens.dense_max, groups.shape[1])


def _commit_histogram(hist: AbsHistogram, data: tuple[F32, Mask, Mask], top: float, size: int,
                      counted: I64) -> None:
    """Add the batch's counts: those of the single pass when the grid held, else a recount on the wider grid."""
    before = hist.exponent
    exponent = hist.prepare(top, size)
    if exponent is None:
        return
    factor = bin_factor(exponent)
    if exponent != before:  # the first grid, or a wider one: the single pass counted on none or the old grid
        counted = np.zeros(hist.bins + 2, dtype=np.int64)
        _compile()["histogram"](*data, factor, counted)
    # counted[c + 1]: values with ceil(|x| / width) == c (slot 0 counted padding); the largest c is the top's
    last = int(np.ceil(type(factor)(top) * factor))
    hist.add_counted(counted[1: last + 2])
