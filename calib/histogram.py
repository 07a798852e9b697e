"""Calibration stage: the |x| histogram TensorRT's calibrators build (fixed bin width, growing range).

Rule (pytorch-quantization ``HistogramCalibrator.collect``, the public reference for TensorRT's
EntropyCalibration2; PLATFORM.md section 6.2):

    first non-zero batch:   width = max|x| / num_bins          edges = [0, w, 2w, ..., num_bins*w]
    later batch, max > top: num_bins = ceil(max|x| / width)    (width kept, bins appended on the right)

    |x|:   0       w      2w            (n-1)w      n*w
           |  b0   |  b1  |  ...   ...  |   b(n-1)   |
    bin j holds w*j < |x| <= w*(j+1) (index ceil(|x|/w) - 1; exact zeros in bin 0), so the first batch's
    maximum lands in bin num_bins-1 and a threshold at edge i keeps exactly the values <= i*w.

A value's bin depends only on the width, never on the current range, and counts are int64: histograms built
with the same width merge exactly (merge == one pass). pytorch-quantization's ``torch.histc`` uses
left-closed bins; the two differ only for values exactly on an edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError

DEFAULT_NUM_BINS = 2048
MAX_BINS = 1 << 20  # a range that outgrows this coarsens the width by a power of two (memory stays bounded)

Counts = npt.NDArray[np.int64]


@dataclass
class AbsHistogram:
    """Histogram of |x| with a fixed bin width fixed by the first non-zero batch (mutable accumulator)."""

    num_bins: int = DEFAULT_NUM_BINS  # bins created by the first non-zero batch
    bin_width: float = 0.0  # 0.0 until a non-zero value was seen (or given to fix the grid up front)
    counts: Counts = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pending_zeros: int = 0  # exact zeros seen before the width was known; they belong to bin 0

    def __post_init__(self) -> None:
        if self.num_bins < 1:
            raise CalibrationError(f"histogram num_bins={self.num_bins} must be at least 1")
        if not (math.isfinite(self.bin_width) and self.bin_width >= 0.0):
            raise CalibrationError(f"histogram bin_width={self.bin_width!r} must be finite and >= 0")

    @property
    def total(self) -> int:
        return int(self.counts.sum()) + self.pending_zeros

    @property
    def edges(self) -> npt.NDArray[np.float64]:
        """Bin edges ``k * width`` for k = 0..len(counts)."""
        return np.arange(len(self.counts) + 1, dtype=np.float64) * self.bin_width

    def _ceil_index(self, values: npt.NDArray[np.float32]) -> npt.NDArray[np.intp]:
        """ceil(|x| / width) in float32 (float64 if the width is tiny): bin ``index - 1``, zeros at -1 -> bin 0."""
        inverse = 1.0 / self.bin_width
        if inverse < 1e30:
            scaled = np.multiply(values, np.float32(inverse), out=values)
        else:  # a tiny width would overflow float32
            scaled = values.astype(np.float64) * inverse
        return np.ceil(scaled, out=scaled).astype(np.intp).ravel()

    def update(self, abs_values: npt.NDArray[np.float32], abs_max: float | None = None) -> None:
        """Add finite non-negative values. ``abs_max`` (their maximum) may be passed to save a pass.

        ``abs_values`` may be overwritten (it is scaled in place to bin indices).
        """
        if abs_values.size == 0:
            return
        top = float(abs_values.max()) if abs_max is None else float(abs_max)
        if self.bin_width == 0.0:
            if top == 0.0:
                self.pending_zeros += int(abs_values.size)
                return
            self.bin_width = top / self.num_bins
            self._resize(self.num_bins)
        # the top bin is computed with the same arithmetic as every value, so a bin never depends on the range
        top_bin = max(int(self._ceil_index(np.array([top], dtype=np.float32))[0]) - 1, 0)
        while top_bin >= MAX_BINS:
            self.coarsen(2)
            top_bin = max(int(self._ceil_index(np.array([top], dtype=np.float32))[0]) - 1, 0)
        if top_bin >= len(self.counts):
            self._resize(top_bin + 1)
        # ceil index c: c == 0 for exact zeros (bin 0), else bin c - 1
        binned = np.bincount(self._ceil_index(abs_values), minlength=len(self.counts) + 1)
        if len(binned) > len(self.counts) + 1:
            raise CalibrationError("histogram bin index beyond the range: the maximum passed was too small")
        self.counts[0] += int(binned[0])
        self.counts += binned[1:]

    def coarsen(self, factor: int) -> None:
        """Merge every ``factor`` adjacent bins: width *= factor (bin J = old bins J*factor .. J*factor+factor-1)."""
        if factor < 1:
            raise CalibrationError(f"coarsening factor {factor} must be >= 1")
        if factor == 1 or self.bin_width == 0.0:
            return
        padded = np.zeros(-(-len(self.counts) // factor) * factor, dtype=np.int64)
        padded[: len(self.counts)] = self.counts
        self.counts = padded.reshape(-1, factor).sum(axis=1)
        self.bin_width *= factor

    def _resize(self, needed: int) -> None:
        grown = np.zeros(max(needed, len(self.counts)), dtype=np.int64)
        grown[: len(self.counts)] = self.counts
        if self.pending_zeros:
            grown[0] += self.pending_zeros
            self.pending_zeros = 0
        self.counts = grown

    def merge(self, other: AbsHistogram) -> AbsHistogram:
        """Add ``other``'s counts into this histogram (same bin width required) and return self."""
        if other.bin_width == 0.0:
            self.pending_zeros += other.pending_zeros
            return self
        if self.bin_width == 0.0:
            zeros = self.pending_zeros
            self.bin_width, self.counts, self.pending_zeros = other.bin_width, other.counts.copy(), 0
            self.counts[0] += zeros + other.pending_zeros
            return self
        if self.bin_width != other.bin_width:
            ratio = max(self.bin_width, other.bin_width) / min(self.bin_width, other.bin_width)
            if ratio == round(ratio):  # one grid refines the other: coarsen the finer one, then add
                finer = self if self.bin_width < other.bin_width else AbsHistogram.from_state(other.state())
                finer.coarsen(round(ratio))
                if finer is not self:
                    return self.merge(finer)
                return self.merge(other)
            raise CalibrationError(
                f"cannot merge histograms with bin widths {self.bin_width!r} and {other.bin_width!r}; "
                "collect both with the same fixed width"
            )
        n = max(len(self.counts), len(other.counts))
        merged = np.zeros(n, dtype=np.int64)
        merged[: len(self.counts)] += self.counts
        merged[: len(other.counts)] += other.counts
        self.counts = merged
        self.pending_zeros += other.pending_zeros
        return self

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        """Arrays that reproduce this histogram exactly (see :meth:`from_state`)."""
        return {
            "num_bins": np.asarray(self.num_bins, dtype=np.int64),
            "bin_width": np.asarray(self.bin_width, dtype=np.float64),
            "counts": self.counts.copy(),
            "pending_zeros": np.asarray(self.pending_zeros, dtype=np.int64),
        }

    @classmethod
    def from_state(cls, state: dict[str, npt.NDArray[np.generic]]) -> AbsHistogram:
        return cls(
            num_bins=int(state["num_bins"]),
            bin_width=float(state["bin_width"]),
            counts=np.asarray(state["counts"], dtype=np.int64).copy(),
            pending_zeros=int(state["pending_zeros"]),
        )
