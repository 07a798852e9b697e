"""Calibration stage: SPARQ numerics (bSPARQ and vSPARQ) on INT8 activations, the NumPy ground truth.

SPARQ: Shomron, Gabbay, Kurzum, Weiser, "Post-Training Sparsity-Aware Quantization", NeurIPS 2021,
arXiv 2105.11010, section 3 (bSPARQ 3.1, vSPARQ 3.2). The exact rules are those of the authors' simulation
kernel (GitHub ``gilshm/sparq``, ``cu_gemm_2x48/gemm_mt_kernel.cu`` and ``slices_{2,3,4,6}bits_macros.h``).
Every lowering of SPARQ is held against this module: the ONNX composition (``builder/lower/sparq_ops.py``),
the plugin's Triton kernel (``plugins/sparq_quant``) and the fake-quant used for accuracy studies.

bSPARQ keeps an n-bit window of an 8-bit magnitude, placed at the lowest of the allowed positions that still
holds the leading one; bits below the window are dropped (truncated, or rounded to nearest, ties to even).
The allowed positions are ``placements`` windows spread evenly from [7 : 8-n] down to [n-1 : 0]:

    n=4, 5 placements ("5opt")   [7:4] [6:3] [5:2] [4:1] [3:0]      every position
    n=4, 3 placements ("3opt")   [7:4]       [5:2]       [3:0]
    n=4, 2 placements ("2opt")   [7:4]                   [3:0]
    n=3, 6 placements            [7:5] [6:4] [5:3] [4:2] [3:1] [2:0]
    n=2, 7 placements            [7:6] [6:5] ... [1:0]
    n=6, 3 placements            [7:2] [6:1] [5:0]

    magnitude 0b0010_1101 (45), n=4, 5opt: leading one at bit 5 -> window [5:2] = 1011 -> 44 (truncate),
    rounding looks at bit 1 (0): 44.  With 3opt the window is [5:2] as well; with 2opt it is [7:4]: 32 / 48.

Those are the paper's options (its kernel has exactly these); any n in 2..7 takes every position
(9 - n placements) by default, or an evenly spaced subset whose neighbouring windows touch or overlap
(:func:`allowed_placements`: n=2 also 4, n=5 also 2, n=6 also 2). n = 7 leaves every signed INT8 code
unchanged (|q| <= 127 fits [6:0], and -128 is one bit): it is allowed as the no-op end of a sweep.

Rounding adds one window LSB when the first dropped bit is 1 and (a lower dropped bit is 1 or the window's LSB
is 1): round half to even of ``magnitude / 2**lsb``. If that carries out of the window, the value saturates
to the window's all-ones (the window never moves up: 0b0001_1111 in [4:1] gives 30, not 32).

vSPARQ pairs consecutive activations along the last axis (the reduction axis of ``MatMul(X, W)``): elements
(0, 1), (2, 3), ...; an odd last element is paired with an implicit zero, as the kernel pads. A pair holding
a zero gives its other member a 2n-bit window (every position; n >= 4 keeps all 8 bits); otherwise both get
bSPARQ with n bits.

Sign-magnitude extension (ours: the paper's activations are UINT8 after ReLU; transformer GEMM inputs are
signed INT8 in [-128, 127]). The window applies to the magnitude |q| read as an 8-bit unsigned number, with the
paper's placement tables unchanged, and the sign is put back afterwards:

    q = -45 -> |q| = 45 -> 44 (as above) -> -44          q = -128 -> 0b1000_0000 -> -128 (always exact)

|q| <= 127 leaves bit 7 clear, so windows whose top is bit 7 are only reached by -128 and by the coarse
3opt/2opt tests (bit 6, or any of bits 6-4, select [7:4]). -128 has one set bit, which the top window of
every option holds exactly, so SPARQ never moves the end of the INT8 range. Saturation has a second ceiling,
the range of the sign: a positive magnitude never exceeds 127 and a negative one 128; a rounded value past
it saturates to the largest window value within it (3opt, |q| in 120..127: +120..+127 give +112, while
-120..-128 give -128). For unsigned 8-bit input (ceiling 255) this is the paper's rule unchanged.
"""

from __future__ import annotations

import enum

import msgspec
import numpy as np
import numpy.typing as npt

from calib.errors import ConfigError, suggest
from calib.quant import dequantize, quantize
from calib.schema import Schema

MIN_WINDOW_BITS = 2
MAX_WINDOW_BITS = 7
ACTIVATION_BITS = 8  # the grid the windows live on (the paper's UINT8; our sign-magnitude INT8)
POSITIVE_CEILING = 127
NEGATIVE_CEILING = 128  # |-128|
UNSIGNED_CEILING = 255

IntArray = npt.NDArray[np.int32]
Int8Array = npt.NDArray[np.int8]
FloatArray = npt.NDArray[np.float32]


class Rounding(enum.StrEnum):
    """How the bits below the window are dropped (the kernel's ``is_round``)."""

    TRUNCATE = "truncate"
    NEAREST_EVEN = "nearest_even"


def allowed_placements(window_bits: int) -> tuple[int, ...]:
    """Placement counts allowed for an n-bit window, largest first.

    p >= 2 evenly spaced windows: p - 1 divides 8 - n, and the step (8 - n) / (p - 1) is at most n, so
    neighbouring windows touch or overlap and the chosen window always holds the leading one (a wider step
    would turn 0b0010_0000 into 0 with n = 2 and windows [7:6], [1:0]).
    """
    check_window_bits(window_bits)
    span = ACTIVATION_BITS - window_bits
    return tuple(p for p in range(span + 1, 1, -1) if span % (p - 1) == 0 and span // (p - 1) <= window_bits)


def check_window_bits(window_bits: int) -> int:
    """Return ``window_bits`` if it is an int in 2..7, else raise ConfigError."""
    if isinstance(window_bits, bool) or not isinstance(window_bits, int) or not (
            MIN_WINDOW_BITS <= window_bits <= MAX_WINDOW_BITS):
        raise ConfigError(f"SPARQ window_bits {window_bits!r} is not allowed; use an integer in "
                          f"{MIN_WINDOW_BITS}..{MAX_WINDOW_BITS} (the paper's 2, 3, 4, 6 or also 5, 7)")
    return window_bits


def check_placements(window_bits: int, placements: int) -> int:
    """Return ``placements`` if an n-bit window allows it, else raise ConfigError naming the allowed set."""
    allowed = allowed_placements(window_bits)
    if isinstance(placements, bool) or not isinstance(placements, int) or placements not in allowed:
        names = ", ".join(f"{p} ({p}opt)" for p in allowed)
        raise ConfigError(
            f"SPARQ placements {placements!r} is not allowed for a {window_bits}-bit window; allowed: {names}"
            + suggest(str(placements), [str(p) for p in allowed])
        )
    return placements


def window_step(window_bits: int, placements: int) -> int:
    """Distance in bits between neighbouring window positions (5opt: 1, 3opt: 2, 2opt: 4)."""
    return (ACTIVATION_BITS - window_bits) // (placements - 1)


class SparqConfig(Schema, frozen=True, kw_only=True):
    """One SPARQ activation quantizer: window width, placements, rounding, and whether pairs share bits.

    ``placements`` None means every position (9 - window_bits: the paper's 5opt for n=4, 6 for n=3, ...).
    """

    window_bits: int = 4
    placements: int | None = None
    rounding: Rounding = Rounding.NEAREST_EVEN
    vsparq: bool = False

    def __post_init__(self) -> None:
        check_window_bits(self.window_bits)
        if self.placements is not None:
            check_placements(self.window_bits, self.placements)
        known = [r.value for r in Rounding]
        if self.rounding not in known:
            raise ConfigError(f"SPARQ rounding {self.rounding!r} is not known; use {', '.join(known)}"
                              + suggest(str(self.rounding), known))
        msgspec.structs.force_setattr(self, "rounding", Rounding(self.rounding))  # a plain string from Python

    @property
    def positions(self) -> int:
        """The number of window placements in force."""
        return self.placements if self.placements is not None else ACTIVATION_BITS + 1 - self.window_bits

    @property
    def wide_bits(self) -> int:
        """Window width a vSPARQ element gets when its partner is zero (2n, at most 8)."""
        return min(2 * self.window_bits, ACTIVATION_BITS)

    def label(self) -> str:
        """Short human name, e.g. ``vSPARQ 4b/5opt nearest_even``."""
        kind = "vSPARQ" if self.vsparq else "bSPARQ"
        return f"{kind} {self.window_bits}b/{self.positions}opt {self.rounding.value}"


def _window_shift(m: IntArray, window_bits: int, placements: int) -> IntArray:
    """LSB position of the window each magnitude gets: the lowest placement that holds its leading one.

    Windows counted from the bottom: j = 0 is [n-1 : 0]; window j (lsb j*d) is needed once the magnitude
    reaches 2**(msb of window j-1 + 1) = 2**(n + (j-1)*d).
    """
    d = window_step(window_bits, placements)
    shift = np.zeros(m.shape, dtype=np.int32)
    for j in range(1, placements):
        shift = np.where(m >= (1 << (window_bits + (j - 1) * d)), np.int32(j * d), shift)
    return shift


def trim_magnitude(
    magnitude: npt.ArrayLike, *, window_bits: int, placements: int, rounding: Rounding,
    ceiling: npt.ArrayLike = UNSIGNED_CEILING,
) -> IntArray:
    """bSPARQ on non-negative magnitudes (0..255): the n-bit window value, as an int32 array.

    ``ceiling`` (broadcast) bounds the result from above: rounding past the window or past the ceiling
    saturates to the largest window value <= ceiling (255: the paper's UINT8 rule; 127/128: INT8 signs).
    """
    check_placements(window_bits, placements)
    m = np.asarray(magnitude).astype(np.int32)
    if m.size and (m.min() < 0 or m.max() > UNSIGNED_CEILING):
        raise ConfigError(f"SPARQ magnitudes must lie in 0..255, got {m.min()}..{m.max()}")
    shift = _window_shift(m, window_bits, placements)
    truncated = m >> shift
    if rounding is Rounding.NEAREST_EVEN:
        # round half to even of m / 2**shift: add half an LSB minus one, plus one more if the kept LSB is odd
        half = (np.int32(1) << shift) >> 1
        bias = np.where(shift > 0, half - 1 + (truncated & 1), 0).astype(np.int32)
        kept = (m + bias) >> shift
    else:
        kept = truncated
    top = np.minimum(np.int32((1 << window_bits) - 1), np.asarray(ceiling, dtype=np.int32) >> shift)
    result: IntArray = (np.minimum(kept, top) << shift).astype(np.int32)
    return result


def _trim_signed(q: IntArray, window_bits: int, placements: int, rounding: Rounding) -> IntArray:
    negative = q < 0
    ceiling = np.where(negative, np.int32(NEGATIVE_CEILING), np.int32(POSITIVE_CEILING))
    r = trim_magnitude(np.abs(q), window_bits=window_bits, placements=placements, rounding=rounding,
                       ceiling=ceiling)
    out: IntArray = np.where(negative, -r, r).astype(np.int32)
    return out


def _as_int8_values(q: npt.ArrayLike) -> IntArray:
    arr = np.asarray(q)
    if arr.dtype != np.int8:
        raise ConfigError(f"SPARQ takes INT8 codes (the output of QuantizeLinear), got dtype {arr.dtype}")
    return arr.astype(np.int32)


def bsparq(q: npt.ArrayLike, config: SparqConfig) -> Int8Array:
    """bSPARQ on INT8 codes (sign-magnitude, see the module docstring); ``config.vsparq`` is ignored."""
    values = _as_int8_values(q)
    return _trim_signed(values, config.window_bits, config.positions, config.rounding).astype(np.int8)


def pair_has_zero(q: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """Per element: is it or its vSPARQ partner (along the last axis) zero? An odd last element: always."""
    values = np.asarray(q)
    if values.ndim == 0:
        raise ConfigError("vSPARQ pairs elements along the last axis; got a scalar")
    zero = values == 0
    cols = values.shape[-1]
    even = cols - cols % 2
    pairs = zero[..., :even].reshape(*zero.shape[:-1], even // 2, 2).any(axis=-1)
    out = np.ones(zero.shape, dtype=bool)  # an odd last element's partner is the kernel's zero padding
    out[..., :even] = np.repeat(pairs, 2, axis=-1)
    return out


def vsparq(q: npt.ArrayLike, config: SparqConfig) -> Int8Array:
    """vSPARQ on INT8 codes, pairs along the last axis: 2n bits next to a zero, else n-bit bSPARQ."""
    values = _as_int8_values(q)
    narrow = _trim_signed(values, config.window_bits, config.positions, config.rounding)
    if config.wide_bits >= ACTIVATION_BITS:
        wide = values
    else:
        wide = _trim_signed(values, config.wide_bits, ACTIVATION_BITS + 1 - config.wide_bits, config.rounding)
    out: Int8Array = np.where(pair_has_zero(values), wide, narrow).astype(np.int8)
    return out


def sparq_int8(q: npt.ArrayLike, config: SparqConfig) -> Int8Array:
    """The SPARQ-trimmed INT8 codes of ``q``: vSPARQ if ``config.vsparq``, else bSPARQ."""
    return vsparq(q, config) if config.vsparq else bsparq(q, config)


def sparq_fake_quant(x: npt.ArrayLike, scale: float, config: SparqConfig) -> FloatArray:
    """DequantizeLinear(SPARQ(QuantizeLinear(x, scale)), scale) for float activations and a per-tensor scale.

    Quantization is ``calib.quant.quantize`` (float32 ``x / scale``, round half to even, saturate to
    [-128, 127]): the codes ONNX QuantizeLinear gives, so this equals the lowered graph bit for bit.
    """
    q = quantize(x, np.float32(scale))
    return dequantize(sparq_int8(q, config), np.float32(scale))


class ZeroPairCounts(Schema, frozen=True, kw_only=True):
    """vSPARQ pair statistics of one tensor; counts add up exactly across batches and shards.

    ``pairs``: pairs seen (an odd last element counts as a pair with an implicit zero); ``with_zero``: pairs in
    which vSPARQ found a zero (its partner keeps 2n bits); ``both_zero``: pairs that are all zero.
    """

    pairs: int = 0
    with_zero: int = 0
    both_zero: int = 0

    @property
    def zero_share(self) -> float:
        """Share of pairs in which vSPARQ found a zero (0.0 for no pairs)."""
        return self.with_zero / self.pairs if self.pairs else 0.0

    def merge(self, other: ZeroPairCounts) -> ZeroPairCounts:
        return ZeroPairCounts(pairs=self.pairs + other.pairs, with_zero=self.with_zero + other.with_zero,
                              both_zero=self.both_zero + other.both_zero)


def zero_pair_counts(q: npt.ArrayLike, rows: npt.ArrayLike | None = None) -> ZeroPairCounts:
    """Count the vSPARQ pairs of INT8 codes ``q`` (pairs along the last axis) that hold a zero.

    ``rows`` (bool, shaped like ``q.shape[:-1]``, e.g. the attention mask) selects the rows to count, so
    padding tokens can be left out; None counts every row.
    """
    values = _as_int8_values(q)
    if values.ndim == 0:
        raise ConfigError("vSPARQ pairs elements along the last axis; got a scalar")
    if rows is not None:
        keep = np.asarray(rows, dtype=bool)
        if keep.shape != values.shape[:-1]:
            raise ConfigError(f"row selection of shape {keep.shape} does not match codes of shape {values.shape}; "
                              f"expected {values.shape[:-1]}")
        values = values[keep]
    cols = values.shape[-1]
    padded = np.concatenate([values, np.zeros((*values.shape[:-1], cols % 2), np.int32)], axis=-1)
    zeros = (padded == 0).reshape(*padded.shape[:-1], (cols + 1) // 2, 2)
    return ZeroPairCounts(pairs=int(np.prod(zeros.shape[:-1])),
                          with_zero=int(np.count_nonzero(zeros.any(axis=-1))),
                          both_zero=int(np.count_nonzero(zeros.all(axis=-1))))


__all__ = [
    "Rounding", "SparqConfig", "ZeroPairCounts", "allowed_placements", "bsparq", "pair_has_zero",
    "sparq_fake_quant", "sparq_int8", "trim_magnitude", "vsparq", "zero_pair_counts",
]
