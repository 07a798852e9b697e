"""Plugin room, LayerNormQuantize: the NumPy reference, the ground truth for the kernel and for ONNX Runtime.

Pipeline stage: evaluation (ONNX Runtime runs plugin nodes through this function) and kernel tests.

Numerics, per row of H values (every step float32 unless said; no fused multiply-add):

    v      = x + residual                                   (inputs upcast to float32 first)
    mean   = f32( sum_f64(v) / H )                          sums in float64: the result does not depend on
    d      = v - mean                                       the summation order, so kernel and reference agree
    var    = f32( sum_f64(f64(d) * f64(d)) / H )            bit for bit (population variance, as ONNX)
    rstd   = 1 / sqrt(var + epsilon)                        IEEE division and square root
    y      = ((d * rstd) * gamma) + beta
    static:    q = sat_int8(round_half_even(y * r)),  r = RN(1 / scale)       (float32 reciprocal)
    per token: s = absmax(y) / 127, r = 127 / absmax(y) (s = r = 1 for an all-zero row);
               q = sat_int8(round_half_even(y * r))

Multiplying by the float32 reciprocal instead of dividing by the scale (TensorRT's x / scale) changes a code
only where x / scale lies within about an ulp of a half-integer: at most one step, about 1e-6 of codes. It
keeps an IEEE division out of the per-element work, which bounds the kernel's speed otherwise.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from plugins.common import INT8_MAX, inverse_scale, round_half_even_to_int8

FloatArray = npt.NDArray[np.floating]


def _normalize(x: FloatArray, gamma: FloatArray, beta: FloatArray, residual: FloatArray | None,
               epsilon: float) -> npt.NDArray[np.float32]:
    v = x.astype(np.float32)
    if residual is not None:
        v = v + residual.astype(np.float32)
    hidden = v.shape[-1]
    mean = (np.sum(v.astype(np.float64), axis=-1, keepdims=True) / hidden).astype(np.float32)
    d = v - mean
    d64 = d.astype(np.float64)  # the square of a float32 is exact in float64
    var = (np.sum(d64 * d64, axis=-1, keepdims=True) / hidden).astype(np.float32)
    rstd = np.float32(1.0) / np.sqrt(var + np.float32(epsilon))
    y: npt.NDArray[np.float32] = ((d * rstd) * gamma.astype(np.float32)) + beta.astype(np.float32)
    return y


def per_token_scale(y: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(absmax(y) / 127, 127 / absmax(y))`` per row ([..., 1]); all-zero rows get (1, 1) (codes all 0)."""
    amax = np.max(np.abs(y), axis=-1, keepdims=True)
    safe = np.where(amax > 0, amax, np.float32(INT8_MAX)).astype(np.float32)
    return (safe / np.float32(INT8_MAX)).astype(np.float32), (np.float32(INT8_MAX) / safe).astype(np.float32)


def layernorm_quantize(
    x: FloatArray,
    gamma: FloatArray,
    beta: FloatArray,
    residual: FloatArray | None = None,
    *,
    epsilon: float,
    scale: float = 1.0,
    per_token: bool = False,
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32] | None, npt.NDArray[np.float32]]:
    """Return ``(q, token_scale, y)``: INT8 codes, the per-token scales (None when static), float32 ``y``.

    The node's optional ``normalized`` output is ``y`` cast to the dtype of ``x``.
    """
    y = _normalize(x, gamma, beta, residual, epsilon)
    if per_token:
        token_scale, inverse = per_token_scale(y)
        return round_half_even_to_int8(y * inverse), token_scale, y
    return round_half_even_to_int8(y * np.float32(inverse_scale(scale))), None, y
