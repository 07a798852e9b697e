"""Calibration stage: symmetric INT8 quantize/dequantize numerics shared by every room.

Conventions (TensorRT's explicit quantization): symmetric, zero-point 0, scale = amax / 127 in
float32, q = clamp(round_half_even(x / scale), -128, 127), x_hat = scale * q. ``np.rint`` rounds half to
even, exactly as TensorRT and ``torch.round`` do.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError

QMIN = -128
QMAX = 127
WEIGHT_QMIN = -127  # weights use the narrow range [-127, 127]

FloatArray = npt.NDArray[np.float32]
Int8Array = npt.NDArray[np.int8]


def scale_from_amax(amax: float) -> np.float32:
    """The float32 INT8 scale of a symmetric range: ``float32(amax / 127)`` (amax computed in float64)."""
    if not (np.isfinite(amax) and amax > 0.0):
        raise CalibrationError(f"range amax={amax!r} must be a finite positive number to give an INT8 scale")
    return np.float32(float(amax) / 127.0)


def _check_scale(scale: npt.ArrayLike) -> npt.NDArray[np.float32]:
    s = np.asarray(scale, dtype=np.float32)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise CalibrationError(f"INT8 scale must be finite and positive, got {s!r}")
    return s


def quantize(x: npt.ArrayLike, scale: npt.ArrayLike, *, narrow: bool = False) -> Int8Array:
    """Symmetric INT8 quantization: clamp(round_half_even(x / scale), -128 (or -127 if narrow), 127).

    ``scale`` broadcasts against ``x`` (a scalar for per-tensor, shaped for per-channel). The division is done
    in float32, as TensorRT's QuantizeLinear does.
    """
    s = _check_scale(scale)
    xf = np.asarray(x, dtype=np.float32)
    q = np.rint(xf / s)
    lo = WEIGHT_QMIN if narrow else QMIN
    out: Int8Array = np.clip(q, lo, QMAX).astype(np.int8)
    return out


def dequantize(q: npt.ArrayLike, scale: npt.ArrayLike) -> FloatArray:
    """x_hat = scale * q in float32."""
    s = _check_scale(scale)
    return (np.asarray(q, dtype=np.float32) * s).astype(np.float32)


def fake_quantize(x: npt.ArrayLike, scale: npt.ArrayLike, *, narrow: bool = False) -> FloatArray:
    """dequantize(quantize(x, scale), scale): the value TensorRT's Q/DQ pair computes."""
    return dequantize(quantize(x, scale, narrow=narrow), scale)
