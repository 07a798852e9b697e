"""The plugin-fusion rewrite on toy graphs built in code: structure, ONNX Runtime equivalence, early errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.lower.fuse_plugins import FusePluginsConfig, fuse_plugins
from calib.errors import ConfigError, GraphError

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_extensions", reason="plugin evaluation needs onnxruntime-extensions")


def _q(name: str, src: str, scale: float, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> str:
    inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
              numpy_helper.from_array(np.array(0, np.int8), f"{name}_z")]
    nodes.append(helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"], name=f"{name}_Q"))
    nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"]))
    return f"{name}_q"


def _toy(hidden: int = 32, ln_scale: float = 0.05, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x, r -> Add -> LN -> Q/DQ -> MatMul -> (+ mask) -> Softmax -> Q/DQ; LN also feeds a residual Add."""
    rng = np.random.default_rng(0)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    inits = [numpy_helper.from_array((rng.random(hidden) + 0.5).astype(np_dtype), "g"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np_dtype) * 0.1, "b"),
             numpy_helper.from_array(rng.standard_normal((hidden, 16)).astype(np_dtype), "w")]
    nodes = [helper.make_node("Add", ["x", "r"], ["sum"], name="residual_add"),
             helper.make_node("LayerNormalization", ["sum", "g", "b"], ["ln"], name="ln", axis=-1, epsilon=1e-5)]
    qln = _q("ln", "ln", ln_scale, nodes, inits)
    nodes += [helper.make_node("MatMul", ["ln_dq", "w"], ["mm"], name="mm"),
              helper.make_node("Add", ["mm", "mask"], ["scores"], name="mask_add"),
              helper.make_node("Softmax", ["scores"], ["sm"], name="softmax", axis=-1)]
    qsm = _q("sm", "sm", 1 / 127, nodes, inits)
    nodes.append(helper.make_node("Add", ["ln", "x"], ["out"], name="next_residual"))
    graph = helper.make_graph(
        nodes, "toy",
        [helper.make_tensor_value_info("x", dtype, ["batch", 5, hidden]),
         helper.make_tensor_value_info("r", dtype, ["batch", 5, hidden]),
         helper.make_tensor_value_info("mask", dtype, ["batch", 1, 16])],
        [helper.make_tensor_value_info(qln, TensorProto.INT8, ["batch", 5, hidden]),
         helper.make_tensor_value_info(qsm, TensorProto.INT8, ["batch", 5, 16]),
         helper.make_tensor_value_info("out", dtype, ["batch", 5, hidden])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fusion_replaces_patterns_and_matches_portable_in_onnx_runtime() -> None:
    from plugins.ort_ops import make_session

    model = _toy()
    result = fuse_plugins(model)
    kinds = [n.op_type for n in result.model.graph.node]
    assert kinds == ["LayerNormQuantize", "DequantizeLinear", "MatMul", "SoftmaxQuantize", "DequantizeLinear", "Add"]
    ln = result.model.graph.node[0]
    assert list(ln.input) == ["x", "g", "b", "r"] and list(ln.output) == ["ln_q", "ln"]
    assert list(result.model.graph.node[3].input) == ["mm", "mask"]
    onnx.checker.check_model(result.model)
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((2, 5, 32)).astype(np.float32),
             "r": rng.standard_normal((2, 5, 32)).astype(np.float32),
             "mask": np.where(rng.random((2, 1, 16)) < 0.3, -1e9, 0).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = make_session(result.model).run(None, feeds)
    for a, b in zip(want[:2], got[:2], strict=True):
        assert np.max(np.abs(a.astype(np.int32) - b.astype(np.int32))) <= 1
        assert np.mean(a == b) >= 0.99
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-5)


def test_config_can_keep_the_adds_and_round_trips() -> None:
    config = FusePluginsConfig(residual=False, mask=False)
    assert FusePluginsConfig.from_json(config.to_json()) == config
    kinds = [n.op_type for n in fuse_plugins(_toy(), config).model.graph.node]
    assert kinds.count("Add") == 3 and "LayerNormQuantize" in kinds and "SoftmaxQuantize" in kinds


@pytest.mark.parametrize(("text", "match"), [
    ('{"layernorm": true, "softmx": false}', r"unknown key 'softmx' at \$; allowed: layernorm, softmax, residual, "
                                            r"mask, .*version; did you mean 'softmax'"),
    ('{"mask": "no"}', r"Expected `bool`, got `str` at \$\.mask"),
    ('{"version": 2}', "fuse-plugins config version 2 not supported; expected 1"),
    ('[true]', "Expected `object`, got `array`"),
])
def test_config_json_is_strict(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FusePluginsConfig.from_json(text)
    assert FusePluginsConfig.from_json('{"residual": false}') == FusePluginsConfig(residual=False)  # version optional


def test_bias_add_is_not_taken_for_a_residual() -> None:
    model = _toy()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 5, 32), np.float32), "bias"))
    model.graph.node[0].input[1] = "bias"
    ln = fuse_plugins(model).model.graph.node[1]
    assert ln.op_type == "LayerNormQuantize" and len(ln.input) == 3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ln_scale": 0.0}, "scale"),
    ({"ln_scale": -0.5}, "scale"),
    ({"hidden": 20000}, r"1\.\.16384"),
    ({"dtype": TensorProto.DOUBLE}, "float64"),
])
def test_bad_graphs_fail_at_graph_building_time(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(GraphError, match=match):
        fuse_plugins(_toy(**kwargs))  # type: ignore[arg-type]


def test_bad_epsilon_fails_at_graph_building_time() -> None:
    model = _toy()
    model.graph.node[1].attribute[1].f = 0.0
    with pytest.raises(GraphError, match="epsilon"):
        fuse_plugins(model)
