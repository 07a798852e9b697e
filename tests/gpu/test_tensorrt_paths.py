"""Full TensorRT on a GPU: the plugin, build and profiling paths that cannot run on a CPU machine.

Run through ``tests/gpu/run_tensorrt_checks.sh`` (needs an NVIDIA GPU and TensorRT >= 10.9); skipped elsewhere.
In order: an ONNX graph with a masked softmax+quantize node and a dynamic sequence axis built with
``--plugin-module`` and run against the NumPy reference; one plugin library loaded for two builds in one
process; a timing cache from another GPU; a profile of an engine with a BF16 output; ``--backend auto``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

trt = pytest.importorskip("tensorrt", reason="needs full TensorRT >= 10.9 (not installable on this CPU machine)")

from builder.backends.options import BackendName, BuildOptions, DimRange, ShapeProfile  # noqa: E402
from builder.engine.build import BuildInputs, build_engine, build_engine_dir  # noqa: E402
from tests.integration.test_plugin_tensorrt import _gpu, run_plan  # noqa: E402
from tests.unit.test_backend_rtx import save, toy_qdq_model  # noqa: E402

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(tuple(int(p) for p in trt.__version__.split(".")[:2]) < (10, 9),
                       reason="AOT Quickly Deployable Plugins need TensorRT >= 10.9"),
    pytest.mark.skipif(not _gpu(), reason="needs an NVIDIA GPU with a CUDA runtime"),
]

HEADS, SCALE = 4, 1 / 127
TRT_OPTIONS = BuildOptions(
    backend=BackendName.TENSORRT, optimization_level=0,
    profiles=(ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=64, max=128)),),
)


def masked_softmax_graph() -> onnx.ModelProto:
    """scores [batch, 4, seq, seq] + mask [batch, 1, 1, seq] -> Softmax -> Q/DQ: fused into the masked plugin."""
    f32 = TensorProto.FLOAT
    inits = [numpy_helper.from_array(np.array(SCALE, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("Add", ["scores", "mask"], ["biased"], name="mask_add"),
             helper.make_node("Softmax", ["biased"], ["p"], name="softmax", axis=-1),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["p_q"], name="p_Q"),
             helper.make_node("DequantizeLinear", ["p_q", "s", "z"], ["p_dq"], name="p_DQ")]
    graph = helper.make_graph(
        nodes, "masked_softmax",
        [helper.make_tensor_value_info("scores", f32, ["batch", HEADS, "seq", "seq"]),
         helper.make_tensor_value_info("mask", f32, ["batch", 1, 1, "seq"])],
        [helper.make_tensor_value_info("p_dq", f32, ["batch", HEADS, "seq", "seq"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_onnx_softmax_plugin_with_dynamic_sequence_via_plugin_module(tmp_path: Path) -> None:
    from builder.lower.fuse_plugins import fuse_plugins
    from plugins.softmax_quant.reference import softmax_quantize

    fused = fuse_plugins(masked_softmax_graph())
    assert fused.count("SoftmaxQuantize") == 1
    path = save(fused.model, tmp_path / "plugin.onnx")
    options = BuildOptions.from_dict({**TRT_OPTIONS.to_dict(),
                                      "plugins": [{"module": "plugins.softmax_quant.plugin", "library": None}]})
    artifact = build_engine(BuildInputs(model_path=path), options, name="plugin")
    assert [p.op for p in artifact.manifest.plugins] == ["build_engine_masked::SoftmaxQuantize"]
    rng = np.random.default_rng(0)
    for batch, seq in ((2, 37), (1, 128), (4, 1)):
        scores = (rng.standard_normal((batch, HEADS, seq, seq)) * 4).astype(np.float32)
        mask = np.where(rng.random((batch, 1, 1, seq)) < 0.2, -1e4, 0.0).astype(np.float32)
        got = run_plan(artifact.plan, {"scores": scores, "mask": mask})["p_dq"]
        want = softmax_quantize(scores, mask, scale=SCALE).astype(np.float32) * np.float32(SCALE)
        steps = np.abs(got - want) / SCALE
        assert steps.max() <= 1.0 + 1e-3 and np.mean(steps > 0.5) <= 1e-4, (batch, seq)


def _plugin_library() -> str:
    """A plugin library that ships with TensorRT itself (its standard plugins)."""
    import ctypes.util

    try:
        import tensorrt_libs

        found = sorted(Path(tensorrt_libs.__path__[0]).glob("libnvinfer_plugin.so*"))
        if found:
            return str(found[0])
    except ImportError:
        pass
    name = ctypes.util.find_library("nvinfer_plugin")
    if name is None:
        pytest.fail("libnvinfer_plugin.so (shipped with TensorRT) was not found")
    return name


def test_same_plugin_library_for_two_builds_in_one_process(tmp_path: Path) -> None:
    path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    options = BuildOptions.from_dict({**TRT_OPTIONS.to_dict(),
                                      "plugins": [{"module": None, "library": _plugin_library()}]})
    first = build_engine(BuildInputs(model_path=path), options, name="first")
    second = build_engine(BuildInputs(model_path=path), options, name="second")  # the library is already loaded
    assert len(first.plan) > 1000 and len(second.plan) > 1000


def test_timing_cache_from_another_gpu_is_replaced_without_losing_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    cache = tmp_path / "timing.cache"
    good = BuildOptions.from_dict({**TRT_OPTIONS.to_dict(), "timing_cache": str(cache)})
    build_engine(BuildInputs(model_path=path), good, name="seed")
    valid = cache.read_bytes()
    # another GPU's cache: same format, different device properties; emulated by flipping its payload bytes
    foreign = valid[:32] + bytes(b ^ 0x5A for b in valid[32:])
    for damaged in (foreign, os.urandom(4096)):
        cache.write_bytes(damaged)
        with caplog.at_level(logging.WARNING, logger="builder.backends.tensorrt"):
            artifact = build_engine(BuildInputs(model_path=path), good, name="again")
        assert len(artifact.plan) > 1000
        assert cache.read_bytes() != damaged  # replaced by this GPU's cache
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="builder.backends.tensorrt"):
        build_engine(BuildInputs(model_path=path), good, name="third")
    assert "another GPU" not in caplog.text  # the replacement is accepted as this GPU's


def bf16_output_graph() -> onnx.ModelProto:
    f32 = TensorProto.FLOAT
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
             helper.make_node("Cast", ["mm"], ["y"], name="to_bf16", to=TensorProto.BFLOAT16)]
    graph = helper.make_graph(nodes, "bf16_out", [helper.make_tensor_value_info("x", f32, ["batch", "seq", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", "seq", 8])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_engine_with_a_bf16_output_is_profiled(tmp_path: Path) -> None:
    from builder.profile.ort import TimingConfig
    from builder.profile.sweep import ProfileTarget, SweepConfig, run_sweep

    path = save(bf16_output_graph(), tmp_path / "bf16.onnx")
    engine = build_engine_dir(BuildInputs(model_path=path), TRT_OPTIONS, tmp_path / "bf16").engine_dir
    config = SweepConfig(batches=(1, 2), seqs=(8,), devices=(), timing=TimingConfig(warmup_ms=10.0, iterations=20))
    report = run_sweep([ProfileTarget(label="bf16", path=engine)], config, tokenizer=None)
    assert [r.runtime for r in report.results] == ["tensorrt", "tensorrt"], report.skipped
    assert all(r.compute.count >= 20 for r in report.results)


def test_auto_backend_picks_full_tensorrt_on_a_gpu() -> None:
    from builder.backends.select import select_backend

    assert select_backend(BackendName.AUTO).name is BackendName.TENSORRT
