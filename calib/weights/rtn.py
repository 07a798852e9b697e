"""Weight quantization stage: scale choice (max, MSE) and round-to-nearest weights.

RTN at 8 bits per channel with max scales is exactly the lowering's INT8 weight rule
(``builder/lower/qdq.py``): scale = float32(amax / 127) with amax in float64, a zero channel gets scale 1,
q = clip(round_half_even(float32(w) / scale), -127, 127) computed in float32, as TensorRT quantizes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from calib.errors import ConfigError
from calib.weights.config import RtnConfig, ScaleMethod
from calib.weights.grid import (
    F32,
    QuantizedWeight,
    check_bits,
    check_scales,
    check_weight,
    qmax,
    round_to_grid,
    row_scales,
    scale_shape,
)

MSE_GRID = 100  # candidate shrinks 1 - i / 100 ...
MSE_MAX_SHRINK = 0.8  # ... down to 0.2 of amax (the GPTQ reference's grid=100, maxshrink=0.8)


def _grouped(weight: npt.NDArray[np.floating], block: int | None) -> npt.NDArray[np.float32]:
    """[G, L, N] view: G = 1 group of all K rows per channel, or K/B blocks of B rows."""
    w = np.asarray(weight, dtype=np.float32)
    k, n = w.shape
    return w.reshape(1, k, n) if block is None else w.reshape(k // block, block, n)


def _scale_from_amax(amax: npt.NDArray[np.float64], bits: int) -> F32:
    out: F32 = np.where(amax > 0, amax / qmax(bits), 1.0).astype(np.float32)
    return out


def max_scales(weight: npt.NDArray[np.floating], bits: int, block: int | None = None) -> F32:
    """float32(amax / qmax) per channel [N] or per block [K/B, N]; 1 where the group is all zero."""
    check_bits(bits)
    k, n = check_weight(weight, block)
    amax = np.max(np.abs(_grouped(weight, block)), axis=1).astype(np.float64)
    return _scale_from_amax(amax, bits).reshape(scale_shape(k, n, block))


def mse_scales(weight: npt.NDArray[np.floating], bits: int, block: int | None = None,
               importance: npt.NDArray[np.floating] | None = None) -> F32:
    """Per group, the shrink r * amax (r = 1.00, 0.99, ..., 0.20) minimising sum_k c_k (w - s*q(w/s))**2.

    ``importance`` c ([K], finite, >= 0; default all 1) weighs each input's error: OPTQ passes diag(H), so the
    scale minimises the diagonal part of the GEMM's output error on the calibration inputs rather than the plain
    weight error. Ties keep the larger scale (the first candidate, r = 1, is max scaling).
    """
    check_bits(bits)
    k, n = check_weight(weight, block)
    w = _grouped(weight, block)
    weights = None
    if importance is not None:
        c = np.asarray(importance, dtype=np.float64)
        if c.shape != (k,) or not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ConfigError(f"input importance must be {k} finite non-negative values, got shape {list(c.shape)}")
        weights = c.reshape(w.shape[0], w.shape[1], 1)
    amax = np.max(np.abs(w), axis=1).astype(np.float64)
    best = _scale_from_amax(amax, bits)
    best_err = np.full(best.shape, np.inf)
    for i in range(int(MSE_MAX_SHRINK * MSE_GRID) + 1):
        candidate = _scale_from_amax(amax * (1.0 - i / MSE_GRID), bits)
        s = candidate[:, None, :]
        deq = round_to_grid(w / s, bits).astype(np.float32) * s
        sq = np.square((w - deq).astype(np.float64))
        err = np.sum(sq if weights is None else sq * weights, axis=1)
        better = err < best_err
        best = np.where(better, candidate, best)
        best_err = np.where(better, err, best_err)
    return best.reshape(scale_shape(k, n, block))


def choose_scales(weight: npt.NDArray[np.floating], bits: int, block: int | None, method: ScaleMethod,
                  importance: npt.NDArray[np.floating] | None = None) -> F32:
    """Scales of ``weight`` by ``method`` (see :class:`calib.weights.config.ScaleMethod`); ``importance``
    weighs each input's error in the MSE search (:func:`mse_scales`)."""
    if method == ScaleMethod.MSE:
        return mse_scales(weight, bits, block, importance)
    return max_scales(weight, bits, block)


def rtn(weight: npt.NDArray[np.floating], config: RtnConfig, *, scales: F32 | None = None) -> QuantizedWeight:
    """Round-to-nearest weight codes of ``weight`` [K, N]; ``scales`` (optional) replaces the scale method."""
    k, n = check_weight(weight, config.block)
    s = (choose_scales(weight, config.bits, config.block, config.scale_method) if scales is None
         else check_scales(scales, k, n, config.block))
    w = np.asarray(weight, dtype=np.float32)
    units = (w / row_scales(s, k, config.block).astype(np.float32)).astype(np.float32)  # float32, as TensorRT
    return QuantizedWeight(values=round_to_grid(units, config.bits), scales=s, bits=config.bits, block=config.block)
