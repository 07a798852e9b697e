"""Plugin room, SparqQuantize: the NumPy reference, the ground truth for the kernel and for ONNX Runtime.

Pipeline stage: evaluation (ONNX Runtime runs plugin nodes through this function) and kernel tests.

Numerics: ``calib.sparq.sparq_int8(calib.quant.quantize(x, scale), config)``, i.e.

    q = sat_int8(round_half_even(x / scale))      float32 IEEE division, as ONNX QuantizeLinear
    y = bSPARQ(q) or vSPARQ(q) along the last axis (calib/sparq.py defines windows, rounding, sign handling)

Unlike the LayerNorm and softmax plugins, the code divides by the scale instead of multiplying by its
reciprocal: the plugin variant then gives exactly the codes of the portable variant (QuantizeLinear followed
by ``builder/lower/sparq_ops.py``), and the kernel is memory-bound, so the division costs nothing measurable.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from calib.quant import quantize
from calib.sparq import SparqConfig, sparq_int8
from plugins.sparq_quant.schema import check_input_shape


def sparq_quantize(x: npt.NDArray[np.floating], *, scale: float, config: SparqConfig) -> npt.NDArray[np.int8]:
    """INT8 codes of ``x`` (float32 or float16, [..., K]) quantized with ``scale`` and trimmed by SPARQ."""
    check_input_shape(tuple(x.shape))
    return sparq_int8(quantize(np.asarray(x, dtype=np.float32), np.float32(scale)), config)
