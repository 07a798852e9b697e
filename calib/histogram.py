"""Calibration stage: the |x| histogram on a declared power-of-two grid (exact merges across data shards).

A histogram declares ``bins``, the most bins its range may span. Its bin width is always a power of two,
the smallest that fits the largest |x| seen into at most ``bins`` bins:

    width = 2**e,   e = min{ e : ceil(max|x| / 2**e) <= bins }     (so max|x| spans bins/2 .. bins bins)

    |x|:   0       w      2w            (n-1)w      n*w
           |  b0   |  b1  |  ...   ...  |   b(n-1)   |
    bin j holds w*j < |x| <= w*(j+1) (index ceil(|x|/w) - 1; exact zeros in bin 0), so a threshold at edge i
    keeps exactly the values <= i*w.

When a larger value arrives the width doubles as often as needed and every pair of adjacent bins merges
(bin J of width 2w holds bins 2J and 2J+1 of width w). Scaling by a power of two is exact in floating point,
so a value's bin depends only on the width; counts are int64. The final width is a function of the largest
|x| alone and the counts of the multiset of values alone, so histograms of data shards merge into exactly the
histogram of one pass over all of them, bit for bit, whatever the order or grouping (what distributed
calibration relies on). TensorRT's calibrators instead fix the width from the first batch's maximum
(2048 bins); with the default of 4096 declared bins, the grid here is never coarser than that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError, ConfigError

DEFAULT_BINS = 4096
MIN_BINS = 128  # the entropy method compares against 128 quantized levels

Counts = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]


def fit_exponent(top: float, bins: int) -> int:
    """The smallest e with ceil(top / 2**e) <= bins, for a finite top > 0 (computed exactly)."""
    mantissa, exponent = math.frexp(top)  # top = mantissa * 2**exponent, 0.5 <= mantissa < 1
    e = exponent - int(math.log2(bins)) - 1
    while math.ceil(math.ldexp(top, -e)) > bins:
        e += 1
    while math.ceil(math.ldexp(top, -(e - 1))) <= bins:
        e -= 1
    del mantissa
    return e


def bin_factor(exponent: int) -> np.float32 | np.float64:
    """2**-exponent, the factor that maps |x| to bin units: a float32 when that is a normal float32 (the float32
    product is then exact, or underflows to a value that lands in the same bin 0), else a float64."""
    factor = math.ldexp(1.0, -exponent)
    return np.float32(factor) if -126 <= -exponent <= 127 else np.float64(factor)


def _scaled(abs_values: F32, exponent: int, overwrite: bool) -> npt.NDArray[np.floating]:
    """|x| / 2**exponent, exact (a power-of-two scaling); in place when ``overwrite`` allows it."""
    factor = bin_factor(exponent)
    if isinstance(factor, np.float32):
        if overwrite and abs_values.flags.writeable:
            return np.multiply(abs_values, factor, out=abs_values)
        return abs_values * factor
    return abs_values.astype(np.float64) * factor


def ceil_indices(abs_values: F32, exponent: int, *, overwrite: bool = False,
                 out: npt.NDArray[np.intp] | None = None) -> npt.NDArray[np.intp]:
    """ceil(|x| / 2**exponent) of every value, flattened: bin index + 1, and 0 for exact zeros (and for subnormals
    whose scaled value underflows to zero: bin 0 either way).

    One fused pass from the scaled floats to integers (``out``, when given, is a reusable buffer of at least
    ``abs_values.size`` elements; ``overwrite`` lets the scaling reuse ``abs_values`` itself). Counting these
    and folding count 0 into bin 0 gives the histogram without two extra integer passes (subtracting 1 and
    clamping at 0).
    """
    scaled = _scaled(abs_values, exponent, overwrite)
    size = scaled.size
    index = np.empty(size, dtype=np.intp) if out is None or out.size < size else out[:size]
    np.ceil(scaled.reshape(-1), out=index, casting="unsafe")
    return index


@dataclass
class AbsHistogram:
    """Histogram of |x| on the declared power-of-two grid (mutable accumulator; see the module docstring)."""

    bins: int = DEFAULT_BINS
    exponent: int | None = None  # width = 2**exponent; None until a non-zero value was seen
    counts: Counts = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pending_zeros: int = 0  # exact zeros seen before the width was known; they belong to bin 0

    def __post_init__(self) -> None:
        if self.bins < MIN_BINS or self.bins & (self.bins - 1):
            raise ConfigError(f"histogram bins={self.bins} must be a power of two >= {MIN_BINS} (e.g. 2048, 4096)")

    @property
    def bin_width(self) -> float:
        """The bin width 2**exponent (0.0 before any non-zero value)."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.pending_zeros

    @property
    def edges(self) -> npt.NDArray[np.float64]:
        """Bin edges ``k * width`` for k = 0..len(counts)."""
        return np.arange(len(self.counts) + 1, dtype=np.float64) * self.bin_width

    def coarsen_to(self, exponent: int) -> None:
        """Widen the bins to 2**exponent (>= the current width): every 2**k adjacent bins merge."""
        if self.exponent is None:
            self.exponent = exponent
            self.counts = np.zeros(1, dtype=np.int64)
            self.counts[0] += self.pending_zeros
            self.pending_zeros = 0
            return
        if exponent < self.exponent:
            raise CalibrationError(f"cannot refine a histogram from 2**{self.exponent} to 2**{exponent}")
        shift = exponent - self.exponent
        if shift == 0:
            return
        if (len(self.counts) - 1) >> shift == 0:  # every bin lands in the new bin 0 (also for huge jumps)
            self.counts = np.array([int(self.counts.sum())], dtype=np.int64)
        else:
            factor = 1 << shift
            padded = np.zeros(-(-len(self.counts) // factor) * factor, dtype=np.int64)
            padded[: len(self.counts)] = self.counts
            self.counts = padded.reshape(-1, factor).sum(axis=1)
        self.exponent = exponent

    def update(self, abs_values: F32, abs_max: float | None = None, *, overwrite: bool = False,
               scratch: npt.NDArray[np.intp] | None = None) -> None:
        """Add finite non-negative float32 values; ``abs_max`` (their maximum) may be passed to save a pass.

        ``overwrite`` lets the binning scale ``abs_values`` in place; ``scratch`` is a reusable index buffer
        (see :func:`ceil_indices`). Neither changes the result.
        """
        if abs_values.size == 0:
            return
        top = float(abs_values.max()) if abs_max is None else float(abs_max)
        exponent = self.prepare(top, int(abs_values.size))
        if exponent is None:
            return
        self.add_counted(np.bincount(ceil_indices(abs_values, exponent, overwrite=overwrite, out=scratch)))

    def prepare(self, top: float, size: int) -> int | None:
        """Widen the grid for a batch of ``size`` values whose largest |x| is ``top``; the bin exponent to count
        them with, or None when they are all zeros seen before any width (counted here as pending zeros)."""
        if top == 0.0 and self.exponent is None:
            self.pending_zeros += size
            return None
        if top > 0.0:
            needed = fit_exponent(top, self.bins)
            if self.exponent is None or needed > self.exponent:
                self.coarsen_to(needed)
        assert self.exponent is not None
        return self.exponent

    def add_counted(self, counted: Counts) -> None:
        """Add ``counted[c]``, the number of values with ceil(|x| / width) == c: bin c - 1 for c >= 1, and the
        exact zeros (c == 0) in bin 0."""
        used = max(len(counted) - 1, 1)
        if used > self.bins:
            raise CalibrationError("histogram bin index beyond the declared grid: the maximum passed was too small")
        if used > len(self.counts):
            grown = np.zeros(used, dtype=np.int64)
            grown[: len(self.counts)] = self.counts
            self.counts = grown
        self.counts[: len(counted) - 1] += counted[1:]
        self.counts[0] += counted[0]

    def merge(self, other: AbsHistogram) -> AbsHistogram:
        """Add ``other``'s counts into this histogram (same declared bins) and return self."""
        if other.bins != self.bins:
            raise CalibrationError(f"cannot merge histograms declared with {self.bins} and {other.bins} bins; "
                                   "collect every shard with the same --bins")
        if other.exponent is None:
            if self.exponent is None:
                self.pending_zeros += other.pending_zeros
            else:
                self.counts[0] += other.pending_zeros
            return self
        if self.exponent is None or other.exponent > self.exponent:
            self.coarsen_to(other.exponent)
        assert self.exponent is not None
        theirs = AbsHistogram(bins=other.bins, exponent=other.exponent, counts=other.counts.copy())
        theirs.coarsen_to(self.exponent)
        n = max(len(self.counts), len(theirs.counts))
        merged = np.zeros(n, dtype=np.int64)
        merged[: len(self.counts)] += self.counts
        merged[: len(theirs.counts)] += theirs.counts
        merged[0] += other.pending_zeros
        self.counts = merged
        return self

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        """Arrays that reproduce this histogram exactly (see :meth:`from_state`)."""
        return {
            "bins": np.asarray(self.bins, dtype=np.int64),
            "exponent": np.asarray(-(2**62) if self.exponent is None else self.exponent, dtype=np.int64),
            "counts": self.counts.copy(),
            "pending_zeros": np.asarray(self.pending_zeros, dtype=np.int64),
        }

    @classmethod
    def from_state(cls, state: dict[str, npt.NDArray[np.generic]]) -> AbsHistogram:
        exponent = int(state["exponent"])
        return cls(bins=int(state["bins"]), exponent=None if exponent == -(2**62) else exponent,
                   counts=np.asarray(state["counts"], dtype=np.int64).copy(),
                   pending_zeros=int(state["pending_zeros"]))
