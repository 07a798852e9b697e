"""Weight-only quantized inputs: analysis refuses them naming the GEMM, the fold restores float weights that
compute bit for bit what ONNX Runtime computed from the integers; analysis reads no weight values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.graph.analyze import analyze
from builder.graph.load import load_model
from builder.graph.report import Role
from builder.intake.dequantize import fold_weight_dequantization
from calib.errors import GraphError
from tests.toy_llama import llama_block_model, toy_roles

K, N = 6, 5


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], opset: int = 21) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])
    ys = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes if n.op_type == "MatMul"]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], ys, initializer=inits),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _int8(shape: tuple[int, ...], seed: int, dtype: type = np.int8) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.random.default_rng(seed).integers(info.min, info.max + 1, shape).astype(dtype)


def _scale(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).uniform(0.001, 0.02, shape)).astype(np.float32)


def _variants() -> dict[str, onnx.ModelProto]:
    t = numpy_helper.from_array
    mm = helper.make_node("MatMul", ["x", "B"], ["y"], name="gemm")
    return {
        "dq-per-axis": _model([helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["B"], name="dq", axis=1), mm],
                              [t(_int8((K, N), 1), "Wq"), t(_scale((N,), 2), "s"), t(_int8((N,), 3), "z")]),
        "dq-blocked": _model([helper.make_node("DequantizeLinear", ["Wq", "s"], ["B"], name="dq", axis=0,
                                               block_size=2), mm],
                             [t(_int8((K, N), 4), "Wq"), t(_scale((K // 2, N), 5), "s")]),
        "dq-uint8-scalar": _model([helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["B"], name="dq"), mm],
                                  [t(_int8((K, N), 6, np.uint8), "Wq"), t(np.array(0.01, np.float32), "s"),
                                   t(np.array(128, np.uint8), "z")]),
        "cast-mul": _model([helper.make_node("Cast", ["Wq"], ["Wf"], name="cast", to=TensorProto.FLOAT),
                            helper.make_node("Mul", ["Wf", "s"], ["B"], name="mul"), mm],
                           [t(_int8((K, N), 7), "Wq"), t(_scale((1, N), 8), "s")]),
        "cast-sub-mul-transpose": _model(
            [helper.make_node("Cast", ["Wq"], ["Wf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Sub", ["Wf", "z"], ["Wc"], name="sub"),
             helper.make_node("Mul", ["s", "Wc"], ["Wt"], name="mul"),
             helper.make_node("Transpose", ["Wt"], ["B"], name="transpose", perm=[1, 0]), mm],
            [t(_int8((N, K), 9), "Wq"), t(np.float32(_int8((N, 1), 10)), "z"), t(_scale((N, 1), 11), "s")]),
    }


def _run(model: onnx.ModelProto) -> list[np.ndarray]:
    """ONNX Runtime without graph rewrites: its optimizer may turn DequantizeLinear -> MatMul into an integer
    GEMM with other rounding, while the fold must reproduce the graph as ONNX defines it."""
    x = np.random.default_rng(0).standard_normal((3, K)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {"x": x})]


@pytest.mark.parametrize("variant", sorted(_variants()))
def test_analysis_refuses_then_the_fold_is_bit_exact(variant: str) -> None:
    model = _variants()[variant]
    with pytest.raises(GraphError, match=r"GEMM 'gemm' reads a weight-only quantized weight \((U?INT8) initializer "
                                         r"'Wq' -> .*fold_weight_dequantization"):
        analyze(model, name=variant)
    folded, fold = fold_weight_dequantization(model)
    for got, expected in zip(_run(folded), _run(model), strict=True):
        np.testing.assert_array_equal(got, expected)
    (entry,) = fold.folded
    assert (entry.initializer, entry.gemms) == ("Wq", ("gemm",))
    assert entry.dtype in ("INT8", "UINT8") and entry.shape in ((K, N), (N, K))
    inits = {i.name: i for i in folded.graph.initializer}
    assert "Wq" not in inits and inits[entry.tensor].data_type == TensorProto.FLOAT
    (a,) = analyze(folded).assignments
    assert (a.role, a.weight) == (Role.GEMM, entry.tensor)
    assert a.weight_path == (("transpose",) if "transpose" in variant else ())
    assert a.weight_axis == (0 if "transpose" in variant else 1)
    assert fold.removed_initializers == len(model.graph.initializer) - len(folded.graph.initializer) + 1
    assert model.graph.node[0].name in {n.name for n in model.graph.node}  # the input model is not changed


def test_a_chain_shared_by_two_gemms_is_folded_once() -> None:
    model = _variants()["cast-mul"]
    model.graph.node.append(helper.make_node("MatMul", ["x", "B"], ["y2"], name="gemm2"))
    model.graph.output.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    folded, fold = fold_weight_dequantization(model)
    assert [(f.tensor, f.gemms) for f in fold.folded] == [("B", ("gemm", "gemm2"))]
    for got, expected in zip(_run(folded), _run(model), strict=True):
        np.testing.assert_array_equal(got, expected)
    assert {a.weight_shared_with for a in analyze(folded).assignments} == {("gemm",), ("gemm2",)}


def test_a_float_model_is_returned_unchanged() -> None:
    model = llama_block_model(layers=1)
    folded, fold = fold_weight_dequantization(model)
    assert fold.folded == () and folded == model


def test_analysis_reads_no_weight_values(tmp_path: Path) -> None:
    """A model whose weights stay in external data (not loaded) analyzes to the same report."""
    model = llama_block_model(lm_head="gemm")
    big = {i.name for i in model.graph.initializer if len(i.raw_data) > 1024}
    truth = toy_roles(model)
    path = tmp_path / "toy.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="toy.data", size_threshold=0)
    lazy = load_model(path, weights=False)
    weights = [i for i in lazy.graph.initializer if i.data_location == TensorProto.EXTERNAL]
    assert {i.name for i in weights} == big
    assert weights and not any(i.raw_data for i in weights)
    full = load_model(path)
    assert all(init.data_location != TensorProto.EXTERNAL for init in full.graph.initializer)
    assert analyze(lazy, name="toy") == analyze(full, name="toy")
    assert {a.node: (a.role.value, a.layer) for a in analyze(lazy).assignments} == truth
