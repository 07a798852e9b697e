"""The ONNX composition of SPARQ (builder/lower/sparq_ops.py) run by ONNX Runtime, bit for bit against calib.sparq;
and the plugin node run through its ONNX Runtime reference op (plugins/ort_ops.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.lower.sparq_ops import MIN_OPSET, find_compositions, sparq_nodes
from calib.errors import ConfigError, GraphError
from calib.quant import quantize
from calib.sparq import Rounding, SparqConfig, allowed_placements, bsparq, sparq_fake_quant, vsparq

INT8 = np.arange(-128, 128, dtype=np.int8)
# ops TensorRT's ONNX parser imports (and TensorRT-RTX builds: tests/integration/test_sparq_rtx.py)
TENSORRT_OPS = {"Cast", "Abs", "Less", "GreaterOrEqual", "Where", "Div", "Round", "Floor", "Min", "Mul", "Neg",
                "Gather", "Equal"}


def composition_model(config: SparqConfig, shape: list[int | str], *, reduction_size: int | None = None,
                      opset: int = MIN_OPSET) -> onnx.ModelProto:
    """codes (int8) -> composition -> trimmed codes (int8), checked by the ONNX checker."""
    nodes, inits = sparq_nodes("codes", "trimmed", "sparq/x", config, reduction_size=reduction_size)
    graph = helper.make_graph(nodes, "sparq", [helper.make_tensor_value_info("codes", TensorProto.INT8, shape)],
                              [helper.make_tensor_value_info("trimmed", TensorProto.INT8, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, codes: np.ndarray, name: str = "codes") -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {name: codes})[0]
    return out


@pytest.mark.parametrize(("n", "p"), [(n, p) for n in range(2, 8) for p in allowed_placements(n)])
@pytest.mark.parametrize("rounding", list(Rounding))
def test_bsparq_composition_equals_the_reference_on_all_256_codes(n: int, p: int, rounding: Rounding) -> None:
    config = SparqConfig(window_bits=n, placements=p, rounding=rounding)
    codes = INT8.reshape(2, 128)
    got = run(composition_model(config, ["rows", 128]), codes)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, bsparq(codes, config))


@pytest.mark.parametrize("n", range(2, 8))
@pytest.mark.parametrize("rounding", list(Rounding))
@pytest.mark.parametrize("odd", [False, True])
def test_vsparq_composition_equals_the_reference_on_every_pair(n: int, rounding: Rounding, odd: bool) -> None:
    a, b = np.meshgrid(INT8, INT8, indexing="ij")
    codes = np.stack([a, b], axis=-1).reshape(256, 512)  # all 65,536 (code, partner) pairs, zeros included
    if odd:
        codes = np.ascontiguousarray(codes[:, :511])  # the last element's partner is the implicit zero
    k = codes.shape[-1]
    config = SparqConfig(window_bits=n, rounding=rounding, vsparq=True)
    got = run(composition_model(config, ["rows", k], reduction_size=k), codes)
    want = vsparq(codes, config)
    np.testing.assert_array_equal(got, want)
    assert (got != bsparq(codes, config)).any() == (n < 7)  # zero partners really widen the window


@pytest.mark.parametrize("opset", [MIN_OPSET, 17, 19])
def test_composition_uses_only_tensorrt_ops_and_is_recognized(opset: int) -> None:
    config = SparqConfig(window_bits=3, rounding=Rounding.TRUNCATE, vsparq=True)
    model = composition_model(config, [2, "seq", 6], reduction_size=6, opset=opset)
    assert {n.op_type for n in model.graph.node} <= TENSORRT_OPS
    assert all(n.name.startswith("sparq/x/") and n.domain == "" for n in model.graph.node)
    assert all(i.name.startswith("sparq/x/") for i in model.graph.initializer)
    codes = np.array([[[3, 0, 77, -77, 127, -128]] * 5] * 2, dtype=np.int8)
    np.testing.assert_array_equal(run(model, codes), vsparq(codes, config))
    [span] = find_compositions(model.graph)
    assert (span.prefix, span.input_name, span.output_name, span.config) == ("sparq/x", "codes", "trimmed", config)


def test_two_compositions_in_one_graph_do_not_collide() -> None:
    first = sparq_nodes("q", "t1", "a", SparqConfig())
    second = sparq_nodes("t1", "t2", "b", SparqConfig(window_bits=2, vsparq=True), reduction_size=4)
    graph = helper.make_graph(first.nodes + second.nodes, "two",
                              [helper.make_tensor_value_info("q", TensorProto.INT8, [1, 4])],
                              [helper.make_tensor_value_info("t2", TensorProto.INT8, [1, 4])],
                              first.initializers + second.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model, full_check=True)
    assert [s.prefix for s in find_compositions(model.graph)] == ["a", "b"]
    codes = np.array([[77, 0, 45, -45]], np.int8)
    want = vsparq(bsparq(codes, SparqConfig()), SparqConfig(window_bits=2, vsparq=True))
    np.testing.assert_array_equal(run(model, codes, "q"), want)
    tail = graph.node[-1]
    del tail.metadata_props[:]
    helper.set_metadata_props(tail, {"build_engine.sparq": "b", "build_engine.sparq.role": "output",
                                     "build_engine.sparq.config": '{"window_bits": 9}'})
    with pytest.raises(GraphError, match=r"'b' config metadata.*window_bits 9"):
        find_compositions(graph)
    del graph.node[-1]  # a pass that drops the output node is caught, not silently accepted
    with pytest.raises(GraphError, match="'b' is incomplete: it lacks its output node"):
        find_compositions(graph)


def test_q_composition_dq_equals_the_fake_quant_reference() -> None:
    """x -> QuantizeLinear -> composition -> DequantizeLinear, as lowering inserts it, on float input."""
    config = SparqConfig(window_bits=4, placements=3, vsparq=True)
    scale = np.float32(0.0123)
    nodes, inits = sparq_nodes("x_q", "x_sparq", "x/sparq", config, reduction_size=8)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]), *nodes,
         helper.make_node("DequantizeLinear", ["x_sparq", "s", "z"], ["y"])],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"), *inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    x = np.random.default_rng(3).laplace(scale=0.3, size=(64, 8)).astype(np.float32)
    x[::3, ::2] = 0.0
    x[0, :4] = [2.0, -2.0, 127.5 * scale, -127.5 * scale]  # saturating and tie codes
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, sparq_fake_quant(x, float(scale), config))
    assert not np.array_equal(got, quantize(x, scale) * scale)  # SPARQ changed something


def test_bad_composition_requests_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="reduction_size, a positive integer; got None"):
        sparq_nodes("a", "b", "p", SparqConfig(vsparq=True))
    with pytest.raises(ConfigError, match="got 0"):
        sparq_nodes("a", "b", "p", SparqConfig(vsparq=True), reduction_size=0)
    with pytest.raises(ConfigError, match="name prefix must be a non-empty string"):
        sparq_nodes("a", "b", "", SparqConfig())
    with pytest.raises(ConfigError, match="both 'a'"):
        sparq_nodes("a", "a", "p", SparqConfig())
    assert len(sparq_nodes("a", "b", "p", SparqConfig(), reduction_size=None).nodes) > 0  # bSPARQ needs no K


def test_plugin_node_runs_through_its_onnx_runtime_reference() -> None:
    pytest.importorskip("onnxruntime_extensions", reason="plugin nodes run through onnxruntime-extensions")
    from plugins.ort_ops import make_session
    from plugins.sparq_quant.reference import sparq_quantize
    from plugins.sparq_quant.schema import DOMAIN, OP_TYPE, SparqQuantizeAttrs

    config = SparqConfig(window_bits=2, rounding=Rounding.TRUNCATE, vsparq=True)
    attrs = SparqQuantizeAttrs.from_config(config, scale=0.02)
    graph = helper.make_graph(
        [helper.make_node(OP_TYPE, ["x"], ["q"], name="sparq_x", domain=DOMAIN, **attrs.to_onnx_attributes()),
         helper.make_node("DequantizeLinear", ["q", "s"], ["y"])],
        "plugin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5])],
        [numpy_helper.from_array(np.array(0.02, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid(DOMAIN, 1)])
    x = np.random.default_rng(5).standard_normal((6, 5)).astype(np.float32)
    x[:, 1] = 0.0
    got = make_session(model).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, sparq_quantize(x, scale=0.02, config=config).astype(np.float32)
                                  * np.float32(0.02))
    np.testing.assert_array_equal(got, sparq_fake_quant(x, 0.02, config))  # same codes as the composition
