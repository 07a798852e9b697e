"""A one-plugin TensorRT engine (ahead-of-time Triton kernel) builds and matches the NumPy reference.

Needs full TensorRT >= 10.9 (``tensorrt.plugin`` AOT plugins) and an NVIDIA GPU; buffers go through Polygraphy's
CUDA wrapper (no torch). Skipped otherwise; ``tests/gpu/run_tensorrt_checks.sh`` runs it first. Built through
the network API (``add_plugin(..., aot=True)``); the ONNX path is ``tests/gpu/test_tensorrt_paths.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="needs full TensorRT >= 10.9 (not installable on this CPU machine)")


def _gpu() -> bool:
    from builder.profile.trt import _cuda
    from calib.errors import BackendUnavailable, ConfigError

    try:
        _cuda()
    except (BackendUnavailable, ConfigError):
        return False
    return True


pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(tuple(int(p) for p in trt.__version__.split(".")[:2]) < (10, 9),
                       reason="AOT Quickly Deployable Plugins need TensorRT >= 10.9"),
    pytest.mark.skipif(not _gpu(), reason="needs an NVIDIA GPU with a CUDA runtime"),
]


def run_plan(plan: bytes, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized engine once (Polygraphy's TrtRunner: shapes set, buffers bound, outputs copied back)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    with TrtRunner(EngineFromBytes(plan)) as runner:
        outputs: dict[str, Any] = runner.infer(feeds)
    return {k: np.asarray(v) for k, v in outputs.items()}


def test_softmax_quant_engine_matches_reference() -> None:
    import tensorrt.plugin as trtp

    from plugins.softmax_quant.plugin import register
    from plugins.softmax_quant.reference import softmax_quantize

    register()
    x = (np.random.default_rng(0).standard_normal((2, 4, 64, 128)) * 4).astype(np.float32)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    inp = network.add_input("x", trt.float32, x.shape)
    node = trtp.op.build_engine.SoftmaxQuantize(inp, scale=np.array([1 / 127], np.float32),
                                                has_mask=np.array([0], np.int32))
    layer = network.add_plugin(node, aot=True)
    layer.get_output(0).name = "y"
    network.mark_output(layer.get_output(0))
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    assert plan is not None
    got = run_plan(bytes(memoryview(plan)), {"x": x})["y"].astype(np.int32)
    diff = np.abs(got - softmax_quantize(x, scale=1 / 127).astype(np.int32))
    assert diff.max() <= 1 and np.mean(diff != 0) <= 1e-4
