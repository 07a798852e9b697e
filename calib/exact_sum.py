"""Calibration stage: an exact, order-independent accumulator of float64 arrays (for mergeable observers).

Floating-point addition is not associative, so a running float sum of per-batch contributions depends on how
the batches were grouped into shards and in which order the shards were merged. :class:`ExactSum` instead adds
every contribution to a *fixed-point* total with a declared resolution of ``2**-frac_bits``:

    contribution v (float64)  --round half to even to a multiple of 2**-frac_bits-->  integer n = rint(v * 2**F)
    n = hi * 2**52 + lo,   0 <= lo < 2**52          (two int64 limbs per element)
    total += n             (integer addition, carry lo -> hi; overflow of hi raises CalibrationError)

Integer addition is associative and commutative, so the total (and every state written from it) is the same
bit for bit however the contributions are grouped or ordered. Each contribution is rounded once, on its own,
to the resolution; that rounding is a function of the contribution alone, never of the running total. Values
are converted back to float64 only when read (:meth:`ExactSum.value`).

Range: |total| < 2**(63 + 52 - F); with the default F = 56 that is about 5.8e17 at a resolution of 1.4e-17.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError, ConfigError

State = dict[str, npt.NDArray[np.generic]]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

LIMB_BITS = 52  # low limb holds lo in [0, 2**52): every |lo| is exact in float64 and two of them fit in int64
DEFAULT_FRAC_BITS = 56
MAX_FRAC_BITS = 200
_LIMB = float(2**LIMB_BITS)
_LO_MASK = np.int64(2**LIMB_BITS - 1)
_HI_LIMIT = float(2**63)


def _checked_add(a: I64, b: I64, what: str) -> I64:
    """a + b in int64, raising CalibrationError where any element overflows (NumPy arrays wrap silently)."""
    total = a + b
    overflow = ((a ^ total) & (b ^ total)) < 0  # both operands' signs differ from the result's
    if np.any(overflow):
        raise CalibrationError(f"exact accumulator overflow while {what}: the high limb passed 2**63; "
                               "use fewer frac_bits (a coarser resolution) for values this large")
    return total


class ExactSum:
    """Exact fixed-point sum of float64 arrays of one shape; merge of partial sums equals one sum, bit for bit."""

    def __init__(self, shape: tuple[int, ...], frac_bits: int = DEFAULT_FRAC_BITS) -> None:
        if not 0 <= frac_bits <= MAX_FRAC_BITS:
            raise ConfigError(f"frac_bits {frac_bits} out of range; allowed 0..{MAX_FRAC_BITS}")
        self.shape = tuple(int(d) for d in shape)
        self.frac_bits = int(frac_bits)
        self.hi: I64 = np.zeros(self.shape, dtype=np.int64)
        self.lo: I64 = np.zeros(self.shape, dtype=np.int64)

    @property
    def resolution(self) -> float:
        """The declared resolution 2**-frac_bits: each added value is rounded to a multiple of it."""
        return float(np.ldexp(1.0, -self.frac_bits))

    def add(self, values: npt.ArrayLike) -> None:
        """Add a float64 array of this shape (each element rounded half to even to the resolution)."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape != self.shape:
            raise CalibrationError(f"exact sum of shape {self.shape} cannot add an array of shape {v.shape}")
        if not np.all(np.isfinite(v)):
            raise CalibrationError("exact sum: contribution has non-finite values (NaN or inf)")
        with np.errstate(over="ignore"):
            units = np.rint(np.ldexp(v, self.frac_bits))  # exact power-of-two scaling, then one rounding
        hi_add = np.floor(units / _LIMB)  # exact: integer-valued float divided by a power of two, floored
        if not np.all(np.abs(hi_add) < _HI_LIMIT):
            raise CalibrationError(
                f"exact sum: |value| up to {float(np.max(np.abs(v))):.3e} exceeds the accumulator range "
                f"2**{63 + LIMB_BITS - self.frac_bits} at frac_bits={self.frac_bits}")
        lo_add = (units - hi_add * _LIMB).astype(np.int64)  # exact integer in [0, 2**52)
        self._add_limbs(hi_add.astype(np.int64), lo_add, "adding a contribution")

    def _add_limbs(self, hi: I64, lo: I64, what: str) -> None:
        lo_total = self.lo + lo  # both in [0, 2**52): no int64 overflow
        carry = lo_total >> LIMB_BITS
        self.lo = lo_total & _LO_MASK
        self.hi = _checked_add(_checked_add(self.hi, hi, what), carry, what)

    def merge(self, other: ExactSum) -> ExactSum:
        """Add another partial sum of the same shape and resolution into this one; returns self."""
        if other.shape != self.shape or other.frac_bits != self.frac_bits:
            raise CalibrationError(f"cannot merge exact sums of shape {other.shape} at frac_bits={other.frac_bits} "
                                   f"into shape {self.shape} at frac_bits={self.frac_bits}")
        self._add_limbs(other.hi, other.lo, "merging")
        return self

    def value(self) -> F64:
        """The total as float64: (hi * 2**52 + lo) * 2**-frac_bits (one rounding unless |hi| >= 2**53)."""
        scaled_hi = np.ldexp(self.hi.astype(np.float64), LIMB_BITS - self.frac_bits)
        total: F64 = scaled_hi + np.ldexp(self.lo.astype(np.float64), -self.frac_bits)
        return total

    def state(self) -> State:
        """Plain arrays (the checkpoint format): both limbs and the resolution."""
        return {"hi": self.hi.copy(), "lo": self.lo.copy(), "frac_bits": np.asarray(self.frac_bits, dtype=np.int64)}

    @classmethod
    def from_state(cls, state: State) -> ExactSum:
        """Rebuild from :meth:`state`; limbs of different shapes or a low limb out of range are rejected."""
        hi = np.asarray(state["hi"], dtype=np.int64)
        lo = np.asarray(state["lo"], dtype=np.int64)
        if hi.shape != lo.shape:
            raise CalibrationError(f"exact sum state: limbs of shapes {hi.shape} and {lo.shape} differ")
        if np.any(lo < 0) or np.any(lo > _LO_MASK):
            raise CalibrationError(f"exact sum state: low limb outside [0, 2**{LIMB_BITS})")
        out = cls(hi.shape, frac_bits=int(state["frac_bits"]))
        out.hi, out.lo = hi.copy(), lo.copy()
        return out
