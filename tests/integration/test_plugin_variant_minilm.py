"""The plugin-variant MiniLM graph runs in ONNX Runtime and agrees with the portable Q/DQ variant.

The portable variant is built here (any portable Q/DQ model works with the comparison): QuantizeLinear ->
DequantizeLinear after every LayerNormalization and Softmax output, scales from a max-range pass over real
VADER calibration sentences. LayerNorm outputs feed their MatMuls through Q/DQ, the residual Add keeps the
float tensor (so the plugin's ``normalized`` output is exercised). The fusion pass turns it into the plugin
variant; both run on different (test-split) sentences and every quantized tensor is compared in INT8 steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builder.lower.fuse_plugins import fuse_plugins
from plugins.layernorm_quant.schema import OP_TYPE as LN_OP
from plugins.softmax_quant.schema import OP_TYPE as SM_OP

pytest.importorskip("onnxruntime_extensions", reason="plugin evaluation needs onnxruntime-extensions")
ort = pytest.importorskip("onnxruntime")


def _feeds(texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    from builder.intake.minilm import tokenizer_json_path

    tok = Tokenizer.from_file(str(tokenizer_json_path()))
    tok.enable_padding()
    tok.enable_truncation(64)
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _with_outputs(model: onnx.ModelProto, names: list[str], elem: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_tensor_value_info(n, elem, None) for n in names)
    return out


def _portable_variant(model: onnx.ModelProto, amax: dict[str, float]) -> tuple[onnx.ModelProto, list[str]]:
    """Insert Q -> DQ after each calibrated tensor; return the model and the Q output names."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    producer_kind = {o: n.op_type for n in g.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    q_names: list[str] = []
    for node in g.node:
        nodes.append(node)
        for t in node.output:
            if t not in amax:
                continue
            scale = np.float32(amax[t] / 127.0)
            g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{t}_s"),
                                  numpy_helper.from_array(np.array(0, np.int8), f"{t}_zp")])
            nodes.append(helper.make_node("QuantizeLinear", [t, f"{t}_s", f"{t}_zp"], [f"{t}_q"], name=f"{t}_Q"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{t}_q", f"{t}_s", f"{t}_zp"], [f"{t}_dq"],
                                          name=f"{t}_DQ"))
            q_names.append(f"{t}_q")
    for node in nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, name in enumerate(node.input):
            keep_float = producer_kind.get(name) == "LayerNormalization" and node.op_type == "Add"
            if name in amax and not keep_float:
                node.input[i] = f"{name}_dq"
    del g.node[:]
    g.node.extend(nodes)
    return out, q_names


@pytest.fixture(scope="module")
def variants(minilm_onnx: Path) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    from calib.data import vader_splits

    model = onnx.load(str(minilm_onnx))
    targets = [n.output[0] for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    calib_texts = [s.text for s in vader_splits(seed=0, calibration=8).calibration]
    probe = _session(_with_outputs(model, targets, onnx.TensorProto.FLOAT))
    values = probe.run(targets, _feeds(calib_texts))
    amax = {t: float(np.max(np.abs(v))) for t, v in zip(targets, values, strict=True)}
    portable, q_names = _portable_variant(model, amax)
    onnx.checker.check_model(portable)
    return model, portable, q_names


def test_plugin_variant_matches_portable_within_one_step(variants: tuple[onnx.ModelProto, onnx.ModelProto,
                                                                              list[str]]) -> None:
    from calib.data import vader_splits
    from plugins.ort_ops import make_session

    _, portable, q_names = variants
    result = fuse_plugins(portable)
    assert result.count(LN_OP) == 13, [f.name for f in result.fused]
    assert result.count(SM_OP) == 6, [f.name for f in result.fused]
    kinds = [n.op_type for n in result.model.graph.node]
    assert "LayerNormalization" not in kinds and "Softmax" not in kinds
    onnx.checker.check_model(result.model)

    texts = [s.text for s in vader_splits(seed=0, calibration=8).test[:4]]
    feeds = _feeds(texts)
    ref = _session(_with_outputs(portable, q_names, onnx.TensorProto.INT8)).run(q_names, feeds)
    got = make_session(_with_outputs(result.model, q_names, onnx.TensorProto.INT8), threads=2).run(q_names, feeds)
    for name, a, b in zip(q_names, ref, got, strict=True):
        assert a.shape == b.shape and b.dtype == np.int8, name
        diff = np.abs(a.astype(np.int32) - b.astype(np.int32))
        within = float(np.mean(diff <= 1))
        assert within >= 0.999, f"{name}: only {within:.5f} of elements within one INT8 step"
