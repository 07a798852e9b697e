"""Model intake stage: a float16 (or bfloat16) model rewritten to compute in float32, exactly.

Users export half-precision ONNX files (``--fp16`` in their exporter); calibration, analysis and the lowering
passes work on float32 graphs. Every half-precision element type becomes float32: initializers and Constant
values (each value converted exactly: float16 and bfloat16 are subsets of float32), the targets of Cast and
the dtype attributes of generator ops, and the declared types of inputs, outputs and intermediate values. The
rewritten model computes in float32 what the file computes in half precision, without the rounding of each
op's result to half precision; its float inputs and outputs become float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

HALF_TYPES = frozenset({TensorProto.FLOAT16, TensorProto.BFLOAT16})
_DTYPE_ATTRIBUTES = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                     "RandomUniformLike": "dtype", "EyeLike": "dtype", "Multinomial": "dtype", "Bernoulli": "dtype"}


@dataclass(frozen=True)
class Upcast:
    """What :func:`upcast_to_float32` changed (all zero: the model had no half-precision type)."""

    initializers: int = 0
    constants: int = 0
    casts: int = 0
    values: int = 0  # declared inputs, outputs and value_info

    @property
    def changed(self) -> bool:
        return bool(self.initializers or self.constants or self.casts or self.values)


def has_half_precision(model: onnx.ModelProto) -> bool:
    """Whether any initializer or declared graph input/output is float16 or bfloat16."""
    graph = model.graph
    return (any(t.data_type in HALF_TYPES for t in graph.initializer)
            or any(v.type.tensor_type.elem_type in HALF_TYPES for v in (*graph.input, *graph.output)))


def _float32(tensor: TensorProto) -> TensorProto:
    array = numpy_helper.to_array(tensor).astype(np.float32)
    out: TensorProto = numpy_helper.from_array(array, tensor.name)
    return out


def upcast_to_float32(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Upcast]:
    """A float32 copy of ``model`` (the model itself, untouched, when it has no half-precision type)."""
    if not has_half_precision(model) and not any(
            n.op_type in _DTYPE_ATTRIBUTES and any(a.name == _DTYPE_ATTRIBUTES[n.op_type] and a.i in HALF_TYPES
                                                   for a in n.attribute) for n in model.graph.node):
        return model, Upcast()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = constants = casts = values = 0
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type in HALF_TYPES:
            graph.initializer[index].CopyFrom(_float32(tensor))
            initializers += 1
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type in HALF_TYPES:
                attribute.t.CopyFrom(_float32(attribute.t))
                constants += 1
            elif (node.op_type in _DTYPE_ATTRIBUTES and attribute.name == _DTYPE_ATTRIBUTES[node.op_type]
                  and attribute.i in HALF_TYPES):
                attribute.i = TensorProto.FLOAT
                casts += 1
    for value in (*graph.input, *graph.output, *graph.value_info):
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type in HALF_TYPES:
            tensor_type.elem_type = TensorProto.FLOAT
            values += 1
    return out, Upcast(initializers=initializers, constants=constants, casts=casts, values=values)
