"""TensorRT-RTX backend: real ahead-of-time builds of toy Q/DQ graphs on the CPU, and bad-input errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.backends.options import BackendName, BuildOptions, DimRange, ShapeProfile
from builder.engine.build import BuildInputs, build_engine, build_engine_dir
from calib.errors import BuildError, ConfigError

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (build-engine[rtx]) is not installed")

HIDDEN, OUT = 16, 8


def toy_qdq_model(
    *, scale_input: bool = True, plugin: bool = False, dynamic: bool = True, x_scale: float = 0.05
) -> onnx.ModelProto:
    """x[b,s,16] -> Q/DQ (per tensor) -> MatMul with a per-channel INT8 weight (DQ, axis 1) -> y[b,s,8]."""
    dims: list[str | int] = ["batch", "seq", HIDDEN] if dynamic else [2, 4, HIDDEN]
    out_dims: list[str | int] = ["batch", "seq", OUT] if dynamic else [2, 4, OUT]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_dims)
    w = np.random.default_rng(0).standard_normal((HIDDEN, OUT)).astype(np.float32)
    w_scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    w_q = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.array(x_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
    ]
    q_inputs = ["x", "x_scale", "x_zero"] if scale_input else ["x", "runtime_scale"]
    nodes = [
        helper.make_node("QuantizeLinear", q_inputs, ["x_q"], name="quant_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"], name="dequant_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], name="dequant_w", axis=1),
        helper.make_node("MatMul", ["x_dq", "w_dq"], ["mm"], name="matmul"),
    ]
    if plugin:
        nodes.append(helper.make_node("LayerNormQuantize", ["mm"], ["y"], name="ln_q", domain="build_engine"))
    else:
        nodes.append(helper.make_node("Identity", ["mm"], ["y"], name="out"))
    graph_inputs = [x]
    if not scale_input:
        graph_inputs.append(helper.make_tensor_value_info("runtime_scale", TensorProto.FLOAT, []))
    graph = helper.make_graph(nodes, "toy_qdq", graph_inputs, [y], inits)
    opsets = [helper.make_opsetid("", 19)] + ([helper.make_opsetid("build_engine", 1)] if plugin else [])
    return helper.make_model(graph, opset_imports=opsets)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


FAST = BuildOptions(
    backend=BackendName.TENSORRT_RTX,
    optimization_level=0,
    architectures=("sm86",),
    profiles=(ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=8, max=16)),),
)


def test_toy_qdq_engine_builds_with_dynamic_profile(tmp_path: Path) -> None:
    model_path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    artifact = build_engine(BuildInputs(model_path=model_path), FAST, name="toy")
    manifest = artifact.manifest
    assert len(artifact.plan) > 1000
    assert manifest.backend == "tensorrt-rtx" and manifest.architectures == ("sm86",)
    assert [(t.name, t.dtype, t.shape) for t in manifest.inputs] == [("x", "float32", (-1, -1, HIDDEN))]
    assert [(t.name, t.dtype, t.shape) for t in manifest.outputs] == [("y", "float32", (-1, -1, OUT))]
    assert manifest.profiles == ({"x": {"min": [1, 1, HIDDEN], "opt": [2, 8, HIDDEN], "max": [4, 16, HIDDEN]}},)


def test_fixed_shape_engine_has_no_profile_and_two_architectures(tmp_path: Path) -> None:
    model_path = save(toy_qdq_model(dynamic=False), tmp_path / "toy.onnx")
    options = BuildOptions(backend=BackendName.TENSORRT_RTX, optimization_level=0, architectures=("sm86", "89"))
    artifact = build_engine(BuildInputs(model_path=model_path), options, name="fixed")
    assert artifact.manifest.profiles == ()
    assert artifact.manifest.architectures == ("sm86", "sm89")
    assert artifact.manifest.inputs[0].shape == (2, 4, HIDDEN)


def test_plugin_variant_is_refused_and_nothing_written(tmp_path: Path) -> None:
    model_path = save(toy_qdq_model(plugin=True), tmp_path / "toy.onnx")
    out = tmp_path / "engines" / "plug"
    with pytest.raises(ConfigError, match="no plugins") as info:
        build_engine_dir(BuildInputs(model_path=model_path), FAST, out)
    assert info.value.exit_code == 2
    assert not out.exists()


def test_q_node_without_range_is_a_build_error(tmp_path: Path) -> None:
    model_path = save(toy_qdq_model(scale_input=False), tmp_path / "toy.onnx")
    out = tmp_path / "engines" / "norange"
    with pytest.raises(BuildError, match=r"quant_x.*no range") as info:
        build_engine_dir(BuildInputs(model_path=model_path), FAST, out)
    assert info.value.exit_code == 4
    assert not out.exists()


def test_non_positive_scale_is_rejected(tmp_path: Path) -> None:
    model_path = save(toy_qdq_model(x_scale=0.0), tmp_path / "toy.onnx")
    with pytest.raises(BuildError, match="strictly positive"):
        build_engine(BuildInputs(model_path=model_path), FAST, name="zero")


def test_missing_external_data_file_is_named(tmp_path: Path) -> None:
    model = toy_qdq_model()
    path = tmp_path / "ext" / "toy.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="toy.weights", size_threshold=0)
    (path.parent / "toy.weights").unlink()
    out = tmp_path / "engines" / "ext"
    with pytest.raises(BuildError, match=r"toy\.weights") as info:
        build_engine_dir(BuildInputs(model_path=path), FAST, out)
    assert info.value.exit_code == 4
    assert not out.exists()


def test_external_data_model_builds_and_is_copied(tmp_path: Path) -> None:
    path = tmp_path / "ext" / "toy.onnx"
    path.parent.mkdir()
    onnx.save(toy_qdq_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="toy.weights", size_threshold=0)
    out = tmp_path / "engines" / "ext"
    outcome = build_engine_dir(BuildInputs(model_path=path), FAST, out)
    assert (out / "toy.weights").read_bytes() == (path.parent / "toy.weights").read_bytes()
    assert outcome.plan_path.is_file()


def test_an_int8_constant_outside_a_dequantize_is_refused_before_building(tmp_path: Path) -> None:
    """A weight-only INT8 export (int8 initializer -> Cast -> Mul -> MatMul) fails inside TensorRT after its
    pre-checks unless it is refused up front: exit 2 naming the initializer, nothing built."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w_q"], ["w_f"], to=TensorProto.FLOAT, name="cast_w"),
         helper.make_node("Mul", ["w_f", "w_scale"], ["w"], name="scale_w"),
         helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "weight_only", [x], [y], [numpy_helper.from_array(np.ones((3, 3), np.int8), "w_q"),
                                  numpy_helper.from_array(np.array(0.5, np.float32), "w_scale")])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), tmp_path / "w8.onnx")
    out = tmp_path / "engines" / "w8"
    with pytest.raises(ConfigError, match=r"initializer 'w_q' holds INT8 values that Cast 'cast_w' reads") as info:
        build_engine_dir(BuildInputs(model_path=path), FAST, out)
    assert info.value.exit_code == 2 and not (out / "manifest.json").exists()


def test_timing_cache_is_refused_on_rtx(tmp_path: Path) -> None:
    model_path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    options = BuildOptions(backend=BackendName.TENSORRT_RTX, optimization_level=0, architectures=("sm86",),
                           timing_cache=str(tmp_path / "tc.bin"))
    with pytest.raises(ConfigError, match="timing cache"):
        build_engine(BuildInputs(model_path=model_path), options, name="tc")


def test_parser_error_is_a_build_error(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.INT8, [2, 3])
    # MatMulInteger is outside TensorRT's Q/DQ contract: the parser refuses it
    # (its INT8 operand is cast from an INT32 constant: an INT8 initializer outside a DQ is refused earlier)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT8),
         helper.make_node("Cast", ["w32"], ["xi2"], to=TensorProto.INT8),
         helper.make_node("MatMulInteger", ["xi", "xi2"], ["y32"], name="mmi"),
         helper.make_node("Cast", ["y32"], ["y"], to=TensorProto.INT8)],
        "bad", [x], [y], [numpy_helper.from_array(np.ones((3, 3), np.int32), "w32")],
    )
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), tmp_path / "bad.onnx")
    with pytest.raises(BuildError, match="ONNX parser rejected"):
        build_engine(BuildInputs(model_path=path), FAST, name="bad")
