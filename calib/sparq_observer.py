"""Calibration stage: the vSPARQ pair observer (how many activation pairs hold a zero INT8 code, at any scale).

vSPARQ (Shomron et al., NeurIPS 2021, arXiv 2105.11010, section 3.2) pairs consecutive activations along the
reduction axis (the last axis: elements (0, 1), (2, 3), ...; an odd last element pairs with an implicit zero)
and gives a code the whole 2n-bit budget when its partner's code is zero. Whether a code is zero depends on the
per-tensor scale s, which the planner decides only after calibration, from the same Statistics:

    q = rint(float32(x) / s) == 0   <=>   float32(|x| / s) <= 0.5   <=>   |x| <= T(s)

T(s) the largest float32 whose quotient by s rounds to at most 0.5 (:func:`zero_threshold`; division is
monotone, so the zero codes are exactly [-T, T]). A pair holds a zero iff min(|x_2i|, |x_2i+1|) <= T, so the
observer keeps the histogram of the pair minima on a fixed grid of float32 bit patterns, and any scale decided
later gets its zero-pair count from it:

    bits(m) = [0 | exponent (8) | mantissa (23)]      bin = the exponent and the top 8 mantissa bits
    bin 0: [0, 2**-40)   bins 1 .. 80 * 256: [2**-40, 2**40) in 256 bins per octave   last: [2**40, inf]

For non-negative floats the bit pattern orders like the value, so every bin is an interval of values and each
one lies entirely below T, entirely above, or holds T. The count of pairs with a zero is therefore bounded
exactly: ``low`` counts the bins below T, ``high`` adds T's own bin (equal when T is its bin's last float),
and a bin spans a relative width of 2**-8, so the bounds differ by the pairs whose minimum lies within 0.4%
of T. The grid is fixed and the counts are integers, so shards merge exactly in any order and grouping.
Mask sentinels (excluded from every other statistic) quantize to -128, never to zero: they count as +inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError, InternalError
from calib.schema import Schema

if TYPE_CHECKING:
    from calib.observers import RowsView

State = dict[str, npt.NDArray[np.generic]]
I64 = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]

MANTISSA_BITS = 8  # mantissa bits kept per bin: 2**8 bins per octave
GRID_MIN_EXPONENT = -40  # values below 2**-40 share bin 0 (with the exact zeros)
GRID_MAX_EXPONENT = 40  # values from 2**40 up share the last bin
_SHIFT = 23 - MANTISSA_BITS
_BASE_KEY = (GRID_MIN_EXPONENT + 127) << MANTISSA_BITS  # bits >> _SHIFT of 2**-40
_TOP_KEY = (GRID_MAX_EXPONENT + 127) << MANTISSA_BITS  # bits >> _SHIFT of 2**40
NUM_BINS = _TOP_KEY - _BASE_KEY + 2
_LOW_BITS = (1 << _SHIFT) - 1


def pair_minima(rows: F32, sentinel: npt.NDArray[np.bool_] | None = None) -> F32:
    """min(|x_2i|, |x_2i+1|) of every pair along the last axis of ``rows`` [N, D], flattened.

    An odd last element is paired with an implicit zero (minimum 0, as the kernel pads); sentinels count as +inf.
    """
    if rows.ndim != 2:
        raise CalibrationError(f"vSPARQ pairs need rows [N, D]; got shape {rows.shape}")
    magnitude = np.abs(rows) if sentinel is None else np.where(sentinel, np.float32(np.inf), np.abs(rows))
    cols = rows.shape[1]
    even = cols - cols % 2
    minima = np.minimum(magnitude[:, 0:even:2], magnitude[:, 1:even:2]).ravel()
    if cols % 2:
        minima = np.concatenate([minima, np.zeros(rows.shape[0], dtype=np.float32)])
    out: F32 = minima.astype(np.float32, copy=False)
    return out


def bin_index(values: F32) -> npt.NDArray[np.intp]:
    """Grid bin of non-negative float32 values (see the module docstring)."""
    keys = (np.ascontiguousarray(values, dtype=np.float32).view(np.int32) >> _SHIFT).astype(np.intp)
    np.subtract(keys, _BASE_KEY - 1, out=keys)
    np.clip(keys, 0, NUM_BINS - 1, out=keys)
    return keys


def zero_threshold(scale: float | np.float32) -> np.float32:
    """T(s): the largest float32 t >= 0 whose code ``rint(float32(t) / s)`` is 0 (calib.quant.quantize)."""
    s = np.float32(scale)
    if not (np.isfinite(s) and s > 0):
        raise CalibrationError(f"INT8 scale must be finite and positive, got {scale!r}")
    half = np.float32(0.5)
    t = np.float32(s * half)
    for _ in range(64):  # the quotient moves by about one ulp per step: a few steps at most
        up = np.nextafter(t, np.float32(np.inf), dtype=np.float32)
        if np.float32(t / s) <= half < np.float32(up / s):
            return t
        t = up if np.float32(up / s) <= half else np.nextafter(t, np.float32(0), dtype=np.float32)
    raise InternalError(f"no zero threshold found near {float(s) / 2!r} for scale {float(s)!r}")


class ZeroPairBounds(Schema, frozen=True, kw_only=True):
    """Pairs in which vSPARQ finds a zero code at one scale: exact bounds ``low <= count <= high``."""

    pairs: int  # pairs observed (padding excluded; an odd last element counts as a pair)
    low: int
    high: int
    threshold: float  # T(s): codes of |x| <= threshold are zero

    @property
    def share(self) -> float:
        """The middle of the bounds as a share of the pairs (0.0 for no pairs)."""
        return (self.low + self.high) / 2 / self.pairs if self.pairs else 0.0


@dataclass
class SparqPairObserver:
    """Histogram of vSPARQ pair minima on the fixed float32 bit-pattern grid (see the module docstring)."""

    kind: ClassVar[str] = "sparq_pairs"
    counts: I64 = field(default_factory=lambda: np.zeros(NUM_BINS, dtype=np.int64))

    def update(self, view: RowsView) -> None:
        if view.rows.size == 0:
            return
        rows = view.rows if view.rows.ndim == 2 else view.rows.reshape(view.rows.shape[0], -1)
        self.update_minima(pair_minima(rows, view.sentinel))

    def update_minima(self, minima: F32) -> None:
        """Fold pair minima (non-negative float32) computed elsewhere."""
        if minima.size:
            self.counts += np.bincount(bin_index(minima), minlength=NUM_BINS)

    def merge(self, other: SparqPairObserver) -> SparqPairObserver:
        self.counts += other.counts
        return self

    @property
    def pairs(self) -> int:
        return int(self.counts.sum())

    def zero_pairs(self, scale: float | np.float32) -> ZeroPairBounds:
        """Exact bounds on the pairs holding a zero code at INT8 scale ``scale``."""
        t = zero_threshold(scale)
        index = int(bin_index(np.array([t], dtype=np.float32))[0])
        low = int(self.counts[:index].sum())
        high = low + int(self.counts[index])
        in_grid = 0 < index < NUM_BINS - 1
        if in_grid and int(np.array(t, dtype=np.float32).view(np.int32)) & _LOW_BITS == _LOW_BITS:
            low = high  # T is the last float of its bin: the whole bin is <= T
        return ZeroPairBounds(pairs=self.pairs, low=low, high=high, threshold=float(t))

    def state(self) -> State:
        nonzero = np.flatnonzero(self.counts)
        return {"bins": nonzero.astype(np.int32), "counts": self.counts[nonzero].copy()}  # sparse: a few % used

    @classmethod
    def from_state(cls, state: State) -> SparqPairObserver:
        bins = np.asarray(state["bins"], dtype=np.int64)
        values = np.asarray(state["counts"], dtype=np.int64)
        if bins.shape != values.shape or (bins.size and (bins.min() < 0 or bins.max() >= NUM_BINS)):
            raise CalibrationError(f"sparq_pairs state: {bins.size} bins for {values.size} counts, or a bin "
                                   f"outside 0..{NUM_BINS - 1}")
        counts = np.zeros(NUM_BINS, dtype=np.int64)
        counts[bins] = values
        return cls(counts)


def grid_edges(index: int) -> tuple[float, float]:
    """[lo, hi) of bin ``index`` as floats (bin 0 starts at 0; the last bin ends at +inf)."""
    if not 0 <= index < NUM_BINS:
        raise CalibrationError(f"bin {index} outside 0..{NUM_BINS - 1}")
    if index == 0:
        return 0.0, math.ldexp(1.0, GRID_MIN_EXPONENT)

    def start(i: int) -> float:
        key = i + _BASE_KEY - 1
        return float(np.array(key << _SHIFT, dtype=np.int32).view(np.float32))

    return start(index), (math.inf if index == NUM_BINS - 1 else start(index + 1))


__all__ = ["NUM_BINS", "SparqPairObserver", "ZeroPairBounds", "bin_index", "pair_minima", "zero_threshold"]
