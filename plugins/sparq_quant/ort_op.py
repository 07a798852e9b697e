"""Plugin room, SparqQuantize: the ONNX Runtime op that evaluates plugin nodes through the NumPy reference.

Pipeline stage: evaluation. ``plugins.ort_ops`` moves a SparqQuantize node into ``ai.onnx.contrib`` under
:func:`variant_name` and calls :func:`register` next to the other plugins' ops; onnxruntime-extensions ops have
fixed input and output types, so there is one op per input dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from calib.errors import BackendUnavailable
from plugins.sparq_quant import reference
from plugins.sparq_quant.schema import OP_TYPE, SparqQuantizeAttrs

_DTYPE_TAGS = {"float32": "f32", "float16": "f16"}


def variant_name(dtype: str) -> str:
    """Op type of the ONNX Runtime op that evaluates a SparqQuantize node whose input is ``dtype``."""
    return f"{OP_TYPE}_{_DTYPE_TAGS[dtype]}"


def _body(x: np.ndarray, **attrs: Any) -> np.ndarray:
    node = SparqQuantizeAttrs.from_onnx_attributes(attrs)
    return reference.sparq_quantize(x, scale=node.scale, config=node.config())


def register(registered: set[str]) -> None:
    """Register one op per input dtype with onnxruntime-extensions, skipping names in ``registered`` (updated)."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as exc:
        raise BackendUnavailable(
            "evaluating plugin nodes needs onnxruntime-extensions; install `build-engine[plugins]`"
        ) from exc
    i, s = PyCustomOpDef.dt_int64, PyCustomOpDef.dt_string
    # the scale arrives as the exact repr of its float32 value (plugins.ort_ops carries it as a string)
    attrs = {"scale": s, "window_bits": i, "placements": i, "round_nearest": i, "vsparq": i,
             "plugin_version": s, "plugin_namespace": s}
    for dtype, dt in (("float32", PyCustomOpDef.dt_float), ("float16", PyCustomOpDef.dt_float16)):
        name = variant_name(dtype)
        if name in registered:
            continue
        onnx_op(op_type=name, inputs=[dt], outputs=[PyCustomOpDef.dt_int8], attrs=attrs)(_body)
        registered.add(name)
