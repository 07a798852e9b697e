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
Mask = npt.NDArray[np.bool_]

EXPONENT_BITS = np.uint32(0x7F800000)  # all ones: inf or NaN
ABS_BITS = np.uint32(0x7FFFFFFF)  # |x| of a float32 bit pattern (monotone in |x| as an unsigned integer)
_jit = numba.njit(nogil=True, cache=True)


@_jit
def indices(x: F32, cols: Mask, factor: Any, limit: float, out: npt.NDArray[np.int32]) -> None:
    """out[j] = ceil(|x[j]| * factor) + 1 (at most limit + 1) where cols[j], else 0 (a padding slot)."""
    for j in range(x.shape[0]):
        scaled = np.ceil(abs(x[j]) * factor)  # a float: NaN and inf fail the test below
        out[j] = (np.int32(scaled) + 1 if scaled < limit else np.int32(limit) + 1) if cols[j] else 0

@_jit
def count(index: npt.NDArray[np.int32], width: int, counted: I64) -> None:
    """counted[index[j]] += 1 for j < width."""
    for j in range(width):
        counted[index[j]] += 1


@_jit
def features(x: F32, keep: Mask, col_lo: F32, col_hi: F32, row_max: U32, factor: Any, counted: I64) -> int:
    """One pass over rows x [N, K] with keep[r]; the histogram too when counted is not empty. Returns the number
    of non-finite values."""
    bits = x.view(np.uint32)
    width = x.shape[1]
    index = np.zeros(width, dtype=np.int32)
    every = np.ones(width, dtype=np.bool_)
    limit = float(counted.shape[0] - 2)
    bad = 0
    for r in range(x.shape[0]):
        if not keep[r]:
            continue
        top = np.uint32(0)
        for j in range(width):
            v = x[r, j]
            col_lo[j] = v if v < col_lo[j] else col_lo[j]
            col_hi[j] = v if v > col_hi[j] else col_hi[j]
            a = bits[r, j] & ABS_BITS
            top = a if a > top else top
            bad += (bits[r, j] & EXPONENT_BITS) == EXPONENT_BITS
        row_max[r] = top
        if counted.shape[0]:
            indices(x[r], every, factor, limit, index)
            count(index, width, counted)
    return bad

@_jit
def masked(x: F32, rows: Mask, cols: Mask, lane_lo: F32, lane_hi: F32, factor: Any, counted: I64) -> int:
    """One pass over x [B, M, K] where rows[b, m] and cols[b, k]: per-lane ranges, the histogram when counted
    has rows. Returns the number of non-finite values."""
    bits = x.view(np.uint32)
    width = x.shape[2]
    index = np.zeros(width, dtype=np.int32)
    limit = float(counted.shape[0] - 2)
    bad = 0
    for b in range(x.shape[0]):
        for m in range(x.shape[1]):
            if not rows[b, m]:
                continue
            for j in range(width):
                v = x[b, m, j]
                ok = cols[b, j]
                lane_lo[j] = v if ok and v < lane_lo[j] else lane_lo[j]
                lane_hi[j] = v if ok and v > lane_hi[j] else lane_hi[j]
                bad += ok and (bits[b, m, j] & EXPONENT_BITS) == EXPONENT_BITS
            if counted.shape[0]:
                indices(x[b, m], cols[b], factor, limit, index)
                count(index, width, counted)
    return bad

@_jit
def histogram(x: F32, rows: Mask, cols: Mask, factor: Any, counted: I64) -> None:
    """The histogram alone over x [B, M, K] (a recount on a wider grid)."""
    width = x.shape[2]
    index = np.zeros(width, dtype=np.int32)
    limit = float(counted.shape[0] - 2)
    for b in range(x.shape[0]):
        for m in range(x.shape[1]):
            if rows[b, m]:
                indices(x[b, m], cols[b], factor, limit, index)
                count(index, width, counted)
