"""Calibration stage: range methods, pure functions from observer statistics to a symmetric ``amax``.

* max         amax = max(|min|, |max|)
* percentile  the upper edge of the |x|-histogram bin where the CDF reaches p, capped at max|x|
* entropy     TensorRT EntropyCalibration2 (KL divergence, 2048 bins -> 128 levels), see :func:`entropy_bin`
* mse         the histogram bin centre that minimises the expected quantize-dequantize squared error
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError, ConfigError

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

ENTROPY_START_BIN = 128
ENTROPY_QUANTIZED_BINS = 128  # 8-bit signed: 128 magnitude levels
MSE_START_BIN = 128
_CHUNK = 2048


def _counts(counts: npt.ArrayLike) -> F64:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size == 0 or not np.all(c >= 0) or c.sum() <= 0:
        raise CalibrationError("range method needs a non-empty histogram with positive total count")
    return c


def _positive(amax: float, what: str) -> float:
    if not (math.isfinite(amax) and amax > 0.0):
        raise CalibrationError(f"{what} gave amax={amax!r}; the observed values are all zero or not finite")
    return amax


def amax_max(minimum: float, maximum: float) -> float:
    """The abs-max range: max(|minimum|, |maximum|)."""
    return _positive(max(abs(minimum), abs(maximum)), "max")


def amax_percentile(counts: npt.ArrayLike, bin_width: float, percentile: float, abs_max: float) -> float:
    """Upper edge of the first bin at which the |x| CDF reaches ``percentile`` %, capped at ``abs_max``.

    Monotone non-decreasing in ``percentile``; 100 gives ``abs_max``.
    """
    if not (0.0 < percentile <= 100.0):
        raise ConfigError(f"percentile {percentile!r} must be in (0, 100], e.g. 99.9, 99.99 or 99.999")
    c = np.asarray(counts, dtype=np.int64)
    cumulative = np.cumsum(c)
    total = int(cumulative[-1]) if c.size else 0
    if total <= 0:
        raise CalibrationError("percentile needs a non-empty histogram")
    target = percentile / 100.0 * total
    index = int(np.searchsorted(cumulative, target, side="left"))
    upper_edge = (min(index, len(c) - 1) + 1) * bin_width
    return _positive(min(upper_edge, abs_max), f"percentile {percentile}")


def _kl(p_counts: F64, q_counts: F64) -> float:
    """KL(P || Q) after normalising both, with scipy.stats.entropy's conventions (0 log 0 = 0, p>0=q -> inf)."""
    if q_counts.sum() <= 0:
        return math.inf
    p = p_counts / p_counts.sum()
    q = q_counts / q_counts.sum()
    positive = p > 0
    if np.any(positive & (q <= 0)):
        return math.inf
    return float(np.sum(p[positive] * np.log(p[positive] / q[positive])))


def _entropy_direct(bins: F64, i: int, levels: int) -> float:
    """KL divergence for threshold bin ``i``, computed term by term (used to settle near-ties)."""
    group = (np.arange(i, dtype=np.int64) * levels) // i  # source bin j -> quantized level
    nonzero = bins[:i] > 0
    sums = np.bincount(group, weights=bins[:i], minlength=levels)
    sizes = np.bincount(group, weights=nonzero.astype(np.float64), minlength=levels)
    expanded = np.where(nonzero, sums[group] / np.maximum(sizes[group], 1.0), 0.0)
    reference = bins[:i].copy()
    reference[-1] += bins[i:].sum()
    return _kl(reference, expanded)


@dataclass(frozen=True)
class _Prefix:
    """Prefix sums of the histogram: counts, non-empty bins and b log b (index j = sum over bins[:j])."""

    total: float
    cum: F64
    cum_nz: I64
    cum_blogb: F64

    @classmethod
    def of(cls, bins: F64) -> _Prefix:
        nonzero = bins > 0
        blogb = np.where(nonzero, bins * np.log(np.where(nonzero, bins, 1.0)), 0.0)
        return cls(total=float(bins.sum()), cum=np.concatenate(([0.0], np.cumsum(bins))),
                   cum_nz=np.concatenate(([0], np.cumsum(nonzero.astype(np.int64)))),
                   cum_blogb=np.concatenate(([0.0], np.cumsum(blogb))))


def _kl_for(prefix: _Prefix, bins: F64, i: I64, levels: int) -> F64:
    """KL(P_i || Q_i) for a vector of candidates ``i`` (see :func:`entropy_divergences`)."""
    total = prefix.total
    k = np.arange(levels + 1, dtype=np.int64)
    starts = (k[None, :] * i[:, None] + levels - 1) // levels  # ceil(k*i/levels); starts[:, levels] == i
    sums = prefix.cum[starts[:, 1:]] - prefix.cum[starts[:, :-1]]
    sizes = np.maximum((prefix.cum_nz[starts[:, 1:]] - prefix.cum_nz[starts[:, :-1]]).astype(np.float64), 1.0)
    s_i = prefix.cum[i]
    last = bins[i - 1]
    clipped = total - s_i
    with np.errstate(divide="ignore", invalid="ignore"):
        log_sums = np.log(np.where(sums > 0, sums, 1.0))
        cross = np.where(sums > 0, sums * (log_sums - np.log(sizes) - np.log(s_i)[:, None]), 0.0).sum(axis=1)
        kl = (prefix.cum_blogb[i] - s_i * math.log(total) - cross) / total
        log_q_last = np.log(sums[:, -1] / sizes[:, -1] / s_i)
        with_clip, without = (last + clipped) / total, last / total
        corr = (with_clip * (np.log(with_clip) - log_q_last)
                - without * (np.log(np.where(last > 0, without, 1.0)) - log_q_last))
        kl = kl + np.where(last > 0, corr, 0.0)
    result: F64 = np.where(((last == 0) & (clipped > 0)) | (s_i <= 0), math.inf, kl)
    return result


def entropy_divergences(counts: npt.ArrayLike, *, levels: int = ENTROPY_QUANTIZED_BINS,
                        start_bin: int = ENTROPY_START_BIN, stride: int = 1) -> tuple[I64, F64]:
    """KL(P_i || Q_i) for every candidate threshold bin i = start_bin, start_bin+stride, ..., len(counts).

    Vectorised form of pytorch-quantization's ``_compute_amax_entropy`` (TensorRT EntropyCalibration2).
    For one candidate i (here 8 source bins onto 4 levels for the picture; really i >= 128 onto 128):

        |x| bins  b0  b1  b2  b3  b4  b5  b6  b7 | b8 ... b(n-1)      clipped mass C = sum(b[i:])
        P_i       b0  b1  b2  b3  b4  b5  b6  b7+C
        level     0   0   1   1   2   2   3   3                       level(j) = floor(j * levels / i)
        Q_i       each level's sum spread evenly over its non-empty bins; empty bins stay 0
        amax_i    i * width                                           KL(P_i || Q_i) decides


        bins[0] := bins[1]                                   (exact zeros would dominate bin 0)
        P_i = bins[0:i], plus the clipped mass sum(bins[i:]) on P_i's last bin
        Q_i: source bin j belongs to level k = floor(j * levels / i); each level's count is spread evenly
             over its non-empty source bins (empty source bins stay 0)
        KL(P_i || Q_i) after normalising P_i and Q_i          (inf where P > 0 = Q, and where Q_i is all zero:
                                                              the reference's NaN there is never a valid choice)

    With T = total, s_k/c_k = level sum / non-empty bins and S_i = sum(bins[:i]) the sum collapses to
    (1/T) [sum_j b_j log b_j - S_i log T - sum_k s_k log(s_k / (c_k S_i))] plus a last-bin correction,
    so each candidate costs O(levels) from prefix sums instead of O(i).
    """
    bins = _counts(counts).copy()
    if len(bins) > 1:
        bins[0] = bins[1]
    n = len(bins)
    candidates = np.arange(start_bin, n + 1, stride, dtype=np.int64)
    if candidates.size == 0:
        return candidates, np.zeros(0, dtype=np.float64)
    prefix = _Prefix.of(bins)
    out = np.empty(candidates.size, dtype=np.float64)
    kernels = _range_kernels()
    if kernels is not None:
        kernels.entropy_scores(bins, prefix.cum, prefix.cum_nz, prefix.cum_blogb, candidates, levels, out)
        return candidates, out
    for lo in range(0, candidates.size, _CHUNK):
        out[lo:lo + _CHUNK] = _kl_for(prefix, bins, candidates[lo:lo + _CHUNK], levels)
    return candidates, out


def entropy_bin(counts: npt.ArrayLike, *, levels: int = ENTROPY_QUANTIZED_BINS,
                start_bin: int = ENTROPY_START_BIN, stride: int = 1) -> int:
    """The threshold bin index i TensorRT's entropy calibrator picks (amax = i * bin_width).

    Minimal KL divergence, ties resolved to the **last** i. Candidates within 1e-9 (relative) of the
    minimum are recomputed term by term so that rounding in the vectorised form cannot move the choice.
    Fewer than ``start_bin`` bins: the whole range (i = len(counts)).
    """
    candidates, kl = entropy_divergences(counts, levels=levels, start_bin=start_bin, stride=stride)
    bins = _counts(counts).copy()
    if len(bins) > 1:
        bins[0] = bins[1]
    if candidates.size == 0 or not np.any(np.isfinite(kl)):
        return len(bins) if candidates.size == 0 else int(candidates[-1])
    best = float(np.min(kl))
    near = np.nonzero(kl <= best + 1e-9 * max(abs(best), 1e-12))[0]
    if near.size == 1:
        return int(candidates[near[0]])
    exact = np.array([_entropy_direct(bins, int(candidates[j]), levels) for j in near])
    last_min = int(np.nonzero(exact == exact.min())[0][-1])
    return int(candidates[near[last_min]])


def amax_entropy(counts: npt.ArrayLike, bin_width: float, *, stride: int = 1) -> float:
    """TensorRT EntropyCalibration2 amax: ``entropy_bin(counts) * bin_width``."""
    return _positive(entropy_bin(counts, stride=stride) * bin_width, "entropy")


def amax_mse(counts: npt.ArrayLike, bin_width: float, *, start_bin: int = MSE_START_BIN,
             max_candidates: int = 1024, levels: int = 127) -> float:
    """The bin centre amax minimising sum_j counts_j * (c_j - dq(q(c_j)))^2 over bin centres c_j.

    Candidates are bin centres from ``start_bin`` on (strided so at most ``max_candidates`` are tried);
    q uses scale amax/``levels``, round half to even and clamp to ``levels`` (the |x| histogram is symmetric;
    127 for INT8). Scores come from the compiled loop (calib.range_kernels) when Numba is present; candidates
    within a relative 1e-9 of the best are rescored term by term, so the choice is that of the direct formula.
    """
    c = _counts(counts)
    n = len(c)
    centers = (np.arange(n, dtype=np.float64) + 0.5) * bin_width
    first = min(start_bin, n - 1)
    stride = max(1, math.ceil((n - first) / max_candidates))
    candidates = centers[first::stride]
    kernels = _range_kernels()
    if kernels is None:
        return _positive(float(candidates[int(np.argmin(_mse_direct(c, centers, candidates, levels)))]), "mse")
    scores = np.empty(candidates.size, dtype=np.float64)
    kernels.mse_scores(c, float(bin_width), candidates, levels, scores)
    near = np.nonzero(scores <= scores.min() * (1.0 + 1e-9))[0]
    exact = _mse_direct(c, centers, candidates[near], levels)
    return _positive(float(candidates[near[int(np.argmin(exact))]]), "mse")


def _mse_direct(c: F64, centers: F64, candidates: F64, levels: int) -> F64:
    """The MSE score of each candidate amax, bin by bin (the reference form)."""
    used = c > 0
    cu, xu = c[used], centers[used]
    errors = np.empty(candidates.size, dtype=np.float64)
    step = max(1, (1 << 22) // max(1, xu.size))
    for lo in range(0, candidates.size, step):
        scale = candidates[lo:lo + step, None] / levels
        dq = np.minimum(np.rint(xu[None, :] / scale), levels) * scale
        errors[lo:lo + step] = ((dq - xu[None, :]) ** 2 * cu[None, :]).sum(axis=1)
    return errors


def _range_kernels() -> ModuleType | None:
    """calib.range_kernels, or None without Numba (the NumPy forms run instead)."""
    try:
        from calib import range_kernels
    except ImportError:
        return None
    return range_kernels
