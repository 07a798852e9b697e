"""Calibration stage: compiled inner loops of the entropy and MSE range methods (calib.methods).

Both methods score every candidate threshold of a histogram; these loops compute the same scores as the
vectorised NumPy forms in calib.methods, in another summation order. The methods settle candidates within a
relative 1e-9 of the best score with the term-by-term reference, so the order never changes a choice.
Imported on first use (Numba caches the machine code on disk).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

_jit = numba.njit(nogil=True, cache=True)


@_jit
def entropy_scores(bins: F64, cum: F64, cum_nz: I64, cum_blogb: F64, candidates: I64, levels: int,
                   out: F64) -> None:
    """KL(P_i || Q_i) for each candidate i: calib.methods._kl_for, one candidate at a time."""
    total = cum[-1]
    log_total = math.log(total)
    for c in range(candidates.shape[0]):
        i = candidates[c]
        s_i = cum[i]
        last = bins[i - 1]
        clipped = total - s_i
        if (last == 0.0 and clipped > 0.0) or s_i <= 0.0:
            out[c] = math.inf
            continue
        log_s = math.log(s_i)
        cross = 0.0
        begin = 0
        level_sum = 0.0
        level_size = 1.0
        for k in range(1, levels + 1):
            end = (k * i + levels - 1) // levels
            level_sum = cum[end] - cum[begin]
            level_size = max(float(cum_nz[end] - cum_nz[begin]), 1.0)
            if level_sum > 0.0:
                cross += level_sum * (math.log(level_sum) - math.log(level_size) - log_s)
            begin = end
        kl = (cum_blogb[i] - s_i * log_total - cross) / total
        if last > 0.0:
            log_q_last = math.log(level_sum / level_size / s_i)
            with_clip, without = (last + clipped) / total, last / total
            kl += with_clip * (math.log(with_clip) - log_q_last) - without * (math.log(without) - log_q_last)
        out[c] = kl


@_jit
def mse_scores(counts: F64, width: float, candidates: F64, levels: int, out: F64) -> None:
    """sum_j counts_j * (c_j - dq(q(c_j)))^2 per candidate amax (bin centres c_j, scale amax/levels).

    The bins of one quantized level q form a run (those with q - 1/2 <= c_j / scale < q + 1/2; the last level
    takes every bin above), so each run is summed against its level q * scale without a rounding per bin; a
    centre exactly between two levels scores the same in either.
    """
    n = counts.shape[0]
    for c in range(candidates.shape[0]):
        scale = candidates[c] / levels
        error = 0.0
        begin = 0
        for q in range(levels + 1):
            end = n
            if q < levels:
                end = min(max(math.ceil((q + 0.5) * scale / width - 0.5), begin), n)
            level = q * scale
            for j in range(begin, end):
                d = (j + 0.5) * width - level
                error += counts[j] * d * d
            begin = end
            if begin >= n:
                break
        out[c] = error
