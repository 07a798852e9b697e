"""A one-plugin TensorRT engine (ahead-of-time Triton kernel) builds and matches the NumPy reference.

Needs full TensorRT >= 10.9 (``tensorrt.plugin`` AOT plugins), a GPU and torch with CUDA; skipped otherwise.
"""

from __future__ import annotations

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt", reason="needs full TensorRT >= 10.9 (not installable on this CPU machine)")
torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.gpu,
    pytest.mark.skipif(tuple(int(p) for p in trt.__version__.split(".")[:2]) < (10, 9),
                       reason="AOT Quickly Deployable Plugins need TensorRT >= 10.9"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


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
    layer = network.add_plugin(trtp.op.build_engine.SoftmaxQuantize(inp, scale=1 / 127, has_mask=0), aot=True)
    network.mark_output(layer.get_output(0))
    config = builder.create_builder_config()
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    xt = torch.from_numpy(x).cuda()
    out = torch.empty(x.shape, dtype=torch.int8, device="cuda")
    context.set_tensor_address("x", xt.data_ptr())
    context.set_tensor_address(engine.get_tensor_name(1), out.data_ptr())
    assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    diff = np.abs(out.cpu().numpy().astype(np.int32) - softmax_quantize(x, scale=1 / 127).astype(np.int32))
    assert diff.max() <= 1 and np.mean(diff != 0) <= 1e-4
