"""Calibration stage: the compiled loops of the fused fold (calib.fused), one pass over an activation in place.

Module-level Numba functions (imported by calib.fused on first use), so that Numba caches their machine code
on disk and a later run loads it instead of compiling (about a second). Every result is a minimum, a maximum,
a bit pattern or an integer count.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]

EXPONENT_BITS = np.uint32(0x7F800000)  # all ones: inf or NaN
ABS_BITS = np.uint32(0x7FFFFFFF)  # |x| of a float32 bit pattern (monotone in |x| as an unsigned integer)
_jit = numba.njit(nogil=True, cache=True)


@_jit
def indices(x: F32, cols: Mask, factor: Any, limit: float, out: U32) -> None:
    """out[j] = ceil(|x[j]| * factor) + 1 (at most limit + 1) where cols[j], else 0 (a padding slot).

    Unsigned, so that counting with them needs no negative-index wraparound (a third faster)."""
    top = np.uint32(limit) + np.uint32(1)
    for j in range(x.shape[0]):
        scaled = np.ceil(abs(x[j]) * factor)  # a float: NaN and inf fail the test below
        out[j] = (np.uint32(scaled) + np.uint32(1) if scaled < limit else top) if cols[j] else np.uint32(0)

@_jit
def count(index: U32, width: int, counted: I64) -> None:
    """counted[index[j]] += 1 for j < width."""
    for j in range(width):
        counted[index[j]] += 1


@_jit
def features(x: F32, keep: Mask, col_lo: F32, col_hi: F32, row_max: U32, factor: Any,
             counted: I64) -> tuple[int, int, np.float32, np.float32]:
    """One pass over rows x [N, K] with keep[r]; the histogram too when counted is not empty. Returns the number
    of rows with non-finite values, of kept rows, and the minimum and maximum."""
    bits = x.view(np.uint32)
    width = x.shape[1]
    index = np.zeros(width, dtype=np.uint32)
    every = np.ones(width, dtype=np.bool_)
    limit = float(counted.shape[0] - 2)
    bad = 0
    kept = 0
    for r in range(x.shape[0]):
        if not keep[r]:
            continue
        kept += 1
        row = x[r]
        for j in range(width):
            v = row[j]
            col_lo[j] = v if v < col_lo[j] else col_lo[j]
            col_hi[j] = v if v > col_hi[j] else col_hi[j]
        top = np.uint32(0)
        row_bits = bits[r]
        for j in range(width):
            a = row_bits[j] & ABS_BITS
            top = a if a > top else top
        row_max[r] = top
        bad += int(top >= EXPONENT_BITS)  # the largest |x| bit pattern is inf or NaN
        if counted.shape[0]:
            indices(row, every, factor, limit, index)
            count(index, width, counted)
    return bad, kept, np.min(col_lo), np.max(col_hi)

@_jit
def masked(x: F32, rows: Mask, cols: Mask, lane_lo: F32, lane_hi: F32, factor: Any,
           counted: I64) -> tuple[int, int, np.float32, np.float32]:
    """One pass over x [B, M, K] where rows[b, m] and cols[b, k]: per-lane ranges, the histogram when counted
    is not empty. Returns the number of rows with non-finite values, of valid values, and the minimum and maximum."""
    bits = x.view(np.uint32)
    width = x.shape[2]
    index = np.zeros(width, dtype=np.uint32)
    limit = float(counted.shape[0] - 2)
    bad = 0
    size = 0
    for b in range(x.shape[0]):
        valid = 0
        for j in range(width):
            valid += cols[b, j]
        for m in range(x.shape[1]):
            if not rows[b, m]:
                continue
            size += valid
            top = np.uint32(0)
            for j in range(width):
                v = x[b, m, j]
                ok = cols[b, j]
                lane_lo[j] = v if ok and v < lane_lo[j] else lane_lo[j]
                lane_hi[j] = v if ok and v > lane_hi[j] else lane_hi[j]
                a = bits[b, m, j] & ABS_BITS if ok else np.uint32(0)
                top = a if a > top else top
            bad += int(top >= EXPONENT_BITS)  # the largest valid |x| bit pattern is inf or NaN
            if counted.shape[0]:
                indices(x[b, m], cols[b], factor, limit, index)
                count(index, width, counted)
    return bad, size, np.min(lane_lo), np.max(lane_hi)

@_jit
def histogram(x: F32, rows: Mask, cols: Mask, factor: Any, counted: I64) -> None:
    """The histogram alone over x [B, M, K] (a recount on a wider grid)."""
    width = x.shape[2]
    index = np.zeros(width, dtype=np.uint32)
    limit = float(counted.shape[0] - 2)
    for b in range(x.shape[0]):
        for m in range(x.shape[1]):
            if rows[b, m]:
                indices(x[b, m], cols[b], factor, limit, index)
                count(index, width, counted)


@_jit
def tokens(row_max: F32, mask: Mask, ids: I64, counts: I64, maxima: F64, repeats: int) -> None:
    """Per valid position (b, s): the largest of row_max[b, :, s] into maxima[id] and repeats into counts[id]."""
    for b in range(row_max.shape[0]):
        for s in range(row_max.shape[2]):
            if not mask[b, s]:
                continue
            top = row_max[b, 0, s]
            for g in range(1, row_max.shape[1]):
                top = row_max[b, g, s] if row_max[b, g, s] > top else top
            token = ids[b, s]
            counts[token] += repeats
            maxima[token] = max(maxima[token], np.float64(top))
