"""A model ONNX Runtime cannot run (a broken export) is reported, by calibration and by evaluation, with the input
shapes and ONNX Runtime's reason: exit 3, not a traceback."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.evaluate.runner import OrtRunner
from calib.collect import CollectOptions, collect
from calib.errors import CalibrationError, GraphError


def _broken() -> onnx.ModelProto:
    """Reshapes [b, s, 4] to [b, s, 2, 3] (a target baked in by a faulty trace): valid ONNX that cannot run."""
    target = numpy_helper.from_array(np.array([0, 0, 2, 3], dtype=np.int64), "target")
    w = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "W")
    nodes = [helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),
             helper.make_node("Expand", ["x3", "shape"], ["h"]),
             helper.make_node("MatMul", ["h", "W"], ["y"]),
             helper.make_node("Reshape", ["y", "target"], ["out"])]
    axes = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
    shape = numpy_helper.from_array(np.array([1, 1, 4], dtype=np.int64), "shape")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph(nodes, "broken", [ids], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [target, w, axes, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_calibration_names_the_shapes_and_the_reason() -> None:
    feeds = [{"input_ids": np.ones((2, 5), dtype=np.int64)}]
    with pytest.raises(CalibrationError, match=r"cannot run the model on a calibration batch \(input_ids \[2, 5\]\)"):
        collect(_broken(), feeds, ["y"], CollectOptions(kinds=("minmax",)))


def test_evaluation_names_the_shapes_and_the_reason() -> None:
    with pytest.raises(GraphError, match=r"cannot run the model on inputs input_ids \[2, 5\]: .*Reshape"):
        OrtRunner(_broken()).run({"input_ids": np.ones((2, 5), dtype=np.int64)}, ["out"])
