"""TensorRT-RTX builds the SPARQ composition between QuantizeLinear and DequantizeLinear in front of a MatMul.

A real ahead-of-time build on the CPU (lowest optimization level, one architecture, dynamic batch x sequence):
x -> Q -> [builder/lower/sparq_ops.py] -> DQ -> MatMul(DQ(INT8 per-channel weight)) -> y. The same graph runs in
ONNX Runtime against the NumPy reference, so what is built is what is checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.backends.options import BackendName, BuildOptions, DimRange, ShapeProfile
from builder.engine.build import BuildInputs, build_engine
from builder.lower.sparq_ops import sparq_nodes
from calib.quant import quantize
from calib.sparq import Rounding, SparqConfig, sparq_fake_quant

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (build-engine[rtx]) is not installed")

HIDDEN, OUT = 16, 8
SCALE = np.float32(0.02)
FAST = BuildOptions(
    backend=BackendName.TENSORRT_RTX,
    optimization_level=0,
    architectures=("sm86",),
    profiles=(ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=8, max=16)),),
)


def sparq_gemm_model(config: SparqConfig) -> onnx.ModelProto:
    """x[b, s, 16] -> Q -> SPARQ composition -> DQ -> MatMul with a per-channel INT8 weight -> y[b, s, 8]."""
    w = np.random.default_rng(0).standard_normal((HIDDEN, OUT)).astype(np.float32)
    w_scale = (np.abs(w).max(axis=0) / np.float32(127)).astype(np.float32)  # per output channel (axis 1)
    w_q = quantize(w, w_scale, narrow=True)
    sparq, inits = sparq_nodes("x_q", "x_sparq", "x/sparq", config, reduction_size=HIDDEN)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="quant_x"),
        *sparq,
        helper.make_node("DequantizeLinear", ["x_sparq", "x_scale", "x_zero"], ["x_dq"], name="dequant_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], name="dequant_w", axis=1),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="matmul"),
    ]
    inits += [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
              numpy_helper.from_array(np.array(SCALE), "x_scale"), numpy_helper.from_array(np.array(0, np.int8),
                                                                                           "x_zero")]
    graph = helper.make_graph(nodes, "sparq_gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("config", [
    SparqConfig(window_bits=4, placements=5, rounding=Rounding.NEAREST_EVEN),
    SparqConfig(window_bits=4, placements=3, rounding=Rounding.TRUNCATE, vsparq=True),
    SparqConfig(window_bits=2, vsparq=True),
], ids=["b4-5opt-round", "v4-3opt-trunc", "v2-7opt-round"])
def test_rtx_builds_sparq_between_q_and_dq(config: SparqConfig, tmp_path: Path) -> None:
    model = sparq_gemm_model(config)
    x = np.random.default_rng(1).laplace(scale=0.5, size=(2, 8, HIDDEN)).astype(np.float32)
    x[..., ::3] = 0.0
    w_dq = (numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_q")).astype(np.float32)
            * numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_scale")))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], sparq_fake_quant(x, float(SCALE), config) @ w_dq,
                               rtol=1e-6, atol=1e-6)  # float32 GEMM; the GEMM input itself is bit-exact
    path = tmp_path / "sparq.onnx"
    onnx.save(model, str(path))
    artifact = build_engine(BuildInputs(model_path=path), FAST, name="sparq")
    assert len(artifact.plan) > 1000
    assert [(t.name, t.dtype, t.shape) for t in artifact.manifest.inputs] == [("x", "float32", (-1, -1, HIDDEN))]
    assert [(t.name, t.dtype, t.shape) for t in artifact.manifest.outputs] == [("y", "float32", (-1, -1, OUT))]
