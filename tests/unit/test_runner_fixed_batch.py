"""Evaluation on a model exported with a static batch (builder.evaluate.runner.OrtRunner): any batch runs, in
slices of the declared size, with the same outputs as running each row alone; and calibration batches of
another size are refused with the option that fixes it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.evaluate.runner import OrtRunner
from calib.collect import validate_feed
from calib.errors import CalibrationError


def _model(batch: int | str) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4) / 7.0, "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["y"]),
             helper.make_node("Reshape", ["y", "flat"], ["rows"])]
    flat = numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "flat")
    graph = helper.make_graph(nodes, "static", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 4]),
                               helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", 4])], [w, flat])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("rows", [1, 2, 5, 6])
def test_a_static_batch_model_runs_any_batch_in_slices(rows: int) -> None:
    x = np.random.default_rng(rows).standard_normal((rows, 2, 3)).astype(np.float32)
    runner = OrtRunner(_model(2))
    assert runner.fixed_batch == 2
    y, flat = runner.run({"x": x}, ["y", "rows"])
    alone = ort.InferenceSession(_model(1).SerializeToString(), providers=["CPUExecutionProvider"])
    expected = [alone.run(["y", "rows"], {"x": x[i:i + 1]}) for i in range(rows)]
    assert np.array_equal(y, np.concatenate([e[0] for e in expected]))
    assert np.array_equal(flat, np.concatenate([e[1] for e in expected]))  # [batch*2, 4]: joined row-major


def test_a_dynamic_batch_model_runs_as_it_is() -> None:
    assert OrtRunner(_model("batch")).fixed_batch is None


def test_calibration_batches_of_another_size_name_the_option_that_fixes_it() -> None:
    session = ort.InferenceSession(_model(1).SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(CalibrationError, match="batches of exactly 1: pass --batch-size 1"):
        validate_feed(session, {"x": np.zeros((4, 2, 3), dtype=np.float32)}, 0)
