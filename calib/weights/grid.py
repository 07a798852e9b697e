"""Weight quantization stage: the symmetric integer weight grid, scale layouts and the quantized-weight result.

Layout (ONNX MatMul): a float weight W is [K, N], K input features (the reduction axis), N output channels.
Signed symmetric integers q in [-(2**(b-1) - 1), 2**(b-1) - 1] (narrow range, zero-point 0) for b = 2..8 bits,
stored as int8; scales are float32.

    per channel:  scales [N]          w[k, c] ~ scales[c] * q[k, c]
    per block B:  scales [K/B, N]     w[k, c] ~ scales[k // B, c] * q[k, c]     (B divides K)

The per-block layout is the one ONNX DequantizeLinear (opset 21) takes for a [K, N] initializer with
``axis=0, block_size=B``; per channel is ``axis=1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from calib.errors import ConfigError, InternalError

MIN_BITS = 2
MAX_BITS = 8

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I8 = npt.NDArray[np.int8]


def check_bits(bits: int) -> None:
    """Weight bits must be an int in 2..8 (ConfigError otherwise)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"weight bits {bits!r} not supported; allowed {MIN_BITS}..{MAX_BITS}")


def qmax(bits: int) -> int:
    """Largest weight code 2**(bits-1) - 1 of the narrow symmetric grid (127 at 8 bits, 7 at 4, 1 at 2)."""
    check_bits(bits)
    return int(2 ** (bits - 1) - 1)


def check_weight(weight: npt.NDArray[np.generic], block: int | None) -> tuple[int, int]:
    """(K, N) of a finite 2-D float weight; ``block`` (if any) must be a positive divisor of K."""
    if weight.ndim != 2:
        raise ConfigError(f"weight must be 2-D [K, N] (MatMul layout), got shape {list(weight.shape)}")
    if not np.issubdtype(weight.dtype, np.floating):
        raise ConfigError(f"weight must be floating point, got {weight.dtype}")
    k, n = (int(d) for d in weight.shape)
    if k == 0 or n == 0:
        raise ConfigError(f"weight shape {list(weight.shape)} is empty")
    if not np.all(np.isfinite(weight)):
        raise ConfigError("weight has NaN or inf values")
    if block is not None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ConfigError(f"weight block {block!r} must be a positive int (or None for per channel)")
        if k % block:
            divisors = [d for d in (16, 32, 64, 128, 256) if k % d == 0]
            raise ConfigError(f"weight block {block} does not divide K={k}; blocks that divide it: {divisors or [k]}")
    return k, n


def scale_shape(k: int, n: int, block: int | None) -> tuple[int, ...]:
    """[N] per channel, [K/B, N] per block."""
    return (n,) if block is None else (k // block, n)


def row_scales(scales: npt.NDArray[np.floating], k: int, block: int | None) -> F64:
    """Scales expanded to one per weight element, float64 [K, N] (a broadcast view when per channel)."""
    s = np.asarray(scales, dtype=np.float64)
    if block is None:
        return np.broadcast_to(s[None, :], (k, s.shape[0]))
    return np.repeat(s, block, axis=0)


def check_scales(scales: npt.NDArray[np.generic], k: int, n: int, block: int | None) -> F32:
    """Caller-given scales as float32 of the layout's shape, finite and positive."""
    expected = scale_shape(k, n, block)
    s = np.asarray(scales, dtype=np.float32)
    if s.shape != expected:
        raise ConfigError(f"scales of shape {list(s.shape)} do not fit weight [{k}, {n}] with block {block}; "
                          f"expected {list(expected)}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ConfigError("scales must be finite and positive")
    return s


def round_to_grid(units: npt.NDArray[np.floating], bits: int) -> I8:
    """clip(round_half_even(units), -qmax, qmax) as int8 (``units`` = value / scale)."""
    limit = qmax(bits)
    out: I8 = np.clip(np.rint(units), -limit, limit).astype(np.int8)
    return out


@dataclass(frozen=True, kw_only=True)
class QuantizedWeight:
    """Integer weight codes and their float32 scales (see the module docstring for the layouts)."""

    values: I8  # [K, N], in [-qmax(bits), qmax(bits)]
    scales: F32  # [N] per channel or [K/B, N] per block
    bits: int
    block: int | None = None

    def __post_init__(self) -> None:
        k, n = self.values.shape
        if self.values.dtype != np.int8 or self.scales.dtype != np.float32:
            raise InternalError(f"QuantizedWeight dtypes {self.values.dtype}/{self.scales.dtype}; want int8/float32")
        if self.scales.shape != scale_shape(k, n, self.block):
            raise InternalError(f"scales {self.scales.shape} do not fit values {self.values.shape}, block {self.block}")
        if int(np.max(np.abs(self.values.astype(np.int16)), initial=0)) > qmax(self.bits):
            raise InternalError(f"weight codes exceed the {self.bits}-bit grid")

    @property
    def axis(self) -> int:
        """The ONNX DequantizeLinear axis of the [K, N] initializer: 1 per channel, 0 per block."""
        return 1 if self.block is None else 0

    def dequantize(self) -> F32:
        """scales * q as float32 [K, N] (what DequantizeLinear computes)."""
        s = self.scales[None, :] if self.block is None else np.repeat(self.scales, self.block, axis=0)
        out: F32 = (self.values.astype(np.float32) * s).astype(np.float32)
        return out
