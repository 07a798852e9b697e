"""Plugin room, SoftmaxQuantize: the NumPy reference, the ground truth for the kernel and for ONNX Runtime.

Pipeline stage: evaluation (ONNX Runtime runs plugin nodes through this function) and kernel tests.

Numerics, per row of N values (float32 unless said; no fused multiply-add):

    z = x + mask                            (inputs upcast to float32; mask broadcast as numpy does)
    m = max(z)                              a fully masked row (m = -inf) counts as m = 0, so e = 0
    e = exp(z - m)
    s = f32( sum_f64(e) )                   float64 sum: independent of the summation order
    c = 1 / (s * scale)                     one IEEE division per row; c = 0 when s = 0
    q = sat_int8(round_half_even(e * c))    a fully masked row gives all zeros, never NaN
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from plugins.common import round_half_even_to_int8

FloatArray = npt.NDArray[np.floating]


def softmax_quantize(x: FloatArray, mask: FloatArray | None = None, *, scale: float) -> npt.NDArray[np.int8]:
    """Return the INT8 codes of ``softmax(x + mask)`` over the last axis at the static ``scale``."""
    z = x.astype(np.float32)
    if mask is not None:
        z = z + mask.astype(np.float32)
    m = np.max(z, axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), np.float32(0.0), m)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(z - m)
    s = np.sum(e.astype(np.float64), axis=-1, keepdims=True).astype(np.float32)
    denom = s * np.float32(scale)
    with np.errstate(divide="ignore"):
        c = np.where(s > 0, np.float32(1.0) / denom, np.float32(0.0)).astype(np.float32)
    return round_half_even_to_int8(e * c)
