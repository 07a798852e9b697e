"""Intake of half-precision models (builder.intake.upcast): the float32 rewrite computes what the file computes,
without rounding each result to half precision, and a float32 model passes through untouched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from builder.intake.upcast import upcast_to_float32


def _half_model(io: int) -> onnx.ModelProto:
    """x [n, 4] -> (Cast to half when io is float) MatMul(W) + Constant bias -> Cast(half) -> y."""
    w = numpy_helper.from_array((np.arange(16).reshape(4, 4) / 8.0).astype(np.float16), "W")
    bias = numpy_helper.from_array(np.float16([0.5, -0.25, 1.0, 2.0]), "b")
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["xh", "W"], ["h"]),
             helper.make_node("Constant", [], ["bias"], value=bias),
             helper.make_node("Add", ["h", "bias"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=io)]
    graph = helper.make_graph(nodes, "half", [helper.make_tensor_value_info("x", io, ["n", 4])],
                              [helper.make_tensor_value_info("y", io, ["n", 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_a_half_model_computes_in_float32_the_same_function() -> None:
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) / 4.0)  # every value and product exact in float16
    w = np.arange(16, dtype=np.float32).reshape(4, 4) / 8.0
    expected = x @ w + np.float32([0.5, -0.25, 1.0, 2.0])  # exact in float32: small multiples of 1/32
    for io in (TensorProto.FLOAT, TensorProto.FLOAT16):
        half = _half_model(io)
        model, upcast = upcast_to_float32(half)
        assert upcast.changed and upcast.initializers == 1 and upcast.constants == 1
        assert upcast.casts == (2 if io == TensorProto.FLOAT16 else 1)
        onnx.checker.check_model(model, full_check=True)
        got = _run(model, x)
        assert got.dtype == np.float32 and np.array_equal(got, expected)
        # the file itself rounds each result to float16: within one float16 step of the float32 result
        theirs = _run(half, x.astype(np.float16) if io == TensorProto.FLOAT16 else x).astype(np.float32)
        assert np.all(np.abs(theirs - expected) <= np.abs(expected) * 2.0 ** -10)
    assert half.graph.initializer[0].data_type == TensorProto.FLOAT16  # the input model is not touched


def test_a_float32_model_is_returned_as_it_is() -> None:
    model, _ = upcast_to_float32(_half_model(TensorProto.FLOAT))
    again, upcast = upcast_to_float32(model)
    assert again is model and not upcast.changed
