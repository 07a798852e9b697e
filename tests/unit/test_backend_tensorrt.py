"""Full TensorRT backend: version rules (always), real builds where ``tensorrt`` imports (GPU machines)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.backends.options import (
    BackendName,
    BuildOptions,
    DimRange,
    Int8Mode,
    LayerDtype,
    LayerPrecision,
    PluginSpec,
    ShapeProfile,
    Typing,
)
from builder.backends.precision import Constraint, LayerView, constrained_layers, onnx_node_of
from builder.backends.tensorrt import check_options, major_version
from builder.engine.build import BuildInputs, build_engine
from calib.errors import BackendUnavailable, ConfigError
from tests.unit.test_backend_rtx import save, toy_qdq_model

WEAK_FP16 = BuildOptions(
    backend=BackendName.TENSORRT,
    typing=Typing.WEAK,
    layer_precisions=(LayerPrecision(pattern="matmul", dtype=LayerDtype.FP16),),
)


def toy_fp32_model() -> onnx.ModelProto:
    """x[b,s,16] -> MatMul -> Relu -> y (no Q/DQ: the implicit-INT8 path quantizes it from the cache)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="matmul"),
             helper.make_node("Relu", ["mm"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "toy_fp32", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tensorrt_11_refuses_removed_features() -> None:
    for options, words in [
        (WEAK_FP16, "weak typing"),
        (BuildOptions(typing=Typing.WEAK, int8_mode=Int8Mode.IMPLICIT, calibration_cache="c"), "implicit INT8"),
    ]:
        with pytest.raises(ConfigError, match=words):
            check_options(11, toy_fp32_model(), options)


def test_tensorrt_10_accepts_weak_typing_and_precision_list() -> None:
    check_options(10, toy_qdq_model(), WEAK_FP16)
    check_options(11, toy_qdq_model(), BuildOptions(backend=BackendName.TENSORRT))


def test_implicit_int8_on_a_qdq_graph_is_refused() -> None:
    options = BuildOptions(typing=Typing.WEAK, int8_mode=Int8Mode.IMPLICIT, calibration_cache="c")
    with pytest.raises(ConfigError, match="without Q/DQ"):
        check_options(10, toy_qdq_model(), options)


def test_plugin_graph_needs_registered_plugins() -> None:
    with pytest.raises(ConfigError, match="--plugin-module"):
        check_options(10, toy_qdq_model(plugin=True), BuildOptions(backend=BackendName.TENSORRT))
    check_options(10, toy_qdq_model(plugin=True), BuildOptions(plugins=(PluginSpec(module="m"),)))


def test_old_or_unreadable_versions() -> None:
    with pytest.raises(BackendUnavailable):
        check_options(8, toy_qdq_model(), BuildOptions())
    assert major_version("10.13.0.35") == 10
    with pytest.raises(BackendUnavailable):
        major_version("x.y")


def test_layer_metadata_names_the_onnx_node() -> None:
    assert onnx_node_of("[ONNX Layer: /layer.5/fc2/MatMul]") == "/layer.5/fc2/MatMul"
    assert onnx_node_of("[ONNX Layer: mm | Local Function: block]") == "mm"
    assert onnx_node_of("") is None and onnx_node_of("matmul") is None


def test_precision_rules_pin_a_nodes_layers_not_its_siblings_and_only_float_outputs() -> None:
    """The parser's layers for node "fc2" (the MatMul and a shape helper), a sibling node "fc2_1" whose layer
    name starts the same, and a layer without metadata. Matching layer *names* against "fc2*" took all four."""
    layers = [
        LayerView(index=0, node="fc2", output_types=("FLOAT",)),
        LayerView(index=1, node="fc2", output_types=("INT64",)),  # shape arithmetic the parser added
        LayerView(index=2, node="fc2_1", output_types=("FLOAT",)),
        LayerView(index=3, node=None, output_types=("FLOAT",)),
        LayerView(index=4, node="gelu", output_types=("FLOAT", "INT32")),
    ]
    rules = (LayerPrecision(pattern="fc2", dtype=LayerDtype.FP16),
             LayerPrecision(pattern="gel?", dtype=LayerDtype.BF16),
             LayerPrecision(pattern="fc2", dtype=LayerDtype.FP32))  # the later rule wins
    assert constrained_layers(layers, rules) == [
        Constraint(index=0, dtype=LayerDtype.FP32, outputs=(0,)),
        Constraint(index=4, dtype=LayerDtype.BF16, outputs=(0,)),
    ]
    with pytest.raises(ConfigError, match="matches no ONNX node"):
        constrained_layers(layers, (LayerPrecision(pattern="fc3", dtype=LayerDtype.FP16),))


# --- real builds: need full TensorRT and a GPU ---------------------------------------------------------------

FAST_TRT = BuildOptions(
    backend=BackendName.TENSORRT,
    optimization_level=0,
    profiles=(ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=8, max=16)),),
)


@pytest.fixture
def trt() -> Any:
    module = pytest.importorskip("tensorrt", reason="full TensorRT is not installed")
    return module


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_strongly_typed_qdq_engine(trt: Any, tmp_path: Path) -> None:
    path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    timing_cache = tmp_path / "timing.cache"
    options = BuildOptions.from_dict({**FAST_TRT.to_dict(), "timing_cache": str(timing_cache)})
    artifact = build_engine(BuildInputs(model_path=path), options, name="toy")
    assert len(artifact.plan) > 1000 and artifact.manifest.backend == "tensorrt"
    assert timing_cache.stat().st_size > 0


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_weakly_typed_engine_with_precision_list(trt: Any, tmp_path: Path) -> None:
    if major_version(str(trt.__version__)) >= 11:
        pytest.skip("TensorRT 11 has no weak typing")
    path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    options = BuildOptions.from_dict({**WEAK_FP16.to_dict(), "optimization_level": 0,
                                      "profiles": FAST_TRT.to_dict()["profiles"]})
    assert len(build_engine(BuildInputs(model_path=path), options, name="weak").plan) > 1000
    bad = BuildOptions.from_dict({**options.to_dict(), "layer_precisions": [{"pattern": "nope*", "dtype": "fp16"}]})
    with pytest.raises(ConfigError, match="matches no ONNX node"):
        build_engine(BuildInputs(model_path=path), bad, name="weak")


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_implicit_int8_reads_our_cache(trt: Any, tmp_path: Path) -> None:
    if major_version(str(trt.__version__)) >= 11:
        pytest.skip("TensorRT 11 removed implicit INT8")
    path = save(toy_fp32_model(), tmp_path / "toy.onnx")
    cache = tmp_path / "calibration.cache"
    cache.write_text("TRT-8501-EntropyCalibration2\n" + "".join(
        f"{name}: {struct.pack('>f', amax / 127.0).hex()}\n" for name, amax in {"x": 3.0, "mm": 9.0, "y": 9.0}.items()
    ))
    options = BuildOptions.from_dict({**FAST_TRT.to_dict(), "typing": "weak", "int8_mode": "implicit",
                                      "calibration_cache": str(cache)})
    before = cache.read_text()
    artifact = build_engine(BuildInputs(model_path=path), options, name="implicit")
    assert len(artifact.plan) > 1000
    assert cache.read_text() == before  # TensorRT read our cache; it never rewrote it
