"""Real TensorRT-RTX engines of MiniLM with the weight quantizers' two stored forms (ahead of time, on the CPU).

* W8A8 and W4A8: ``int8-gemm`` with 8-bit (or 4-bit) weights per output channel, stored as INT8 codes in
  [-127, 127] (or [-7, 7]) behind per-channel DequantizeLinear (the W8A8 form; WnA8 engines);
* W4A16: weight-only GEMMs (activation quantizer ``none``) with INT4 weights in blocks of 128 (and 32) inputs
  behind block-wise DequantizeLinear at opset 21, the form of TensorRT's weight-only INT4 GEMMs.

RTN weights (no extra calibration pass): the storage is what the builder sees, whichever quantizer chose the
codes. Each graph is also run in ONNX Runtime on a few held-out sentences against FP32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from builder.engine.build import BuildInputs, build_engine_dir
from builder.graph.report import Role
from builder.pipeline import quantize, resolve_recipe
from builder.quant.none import NoneConfig
from builder.quant.rtn import RtnConfig
from builder.recipes.model import WEIGHT_GEMM_ROLES, Precision, Rule, Selector, Settings
from tests.integration.test_rtx_build import OPTIONS, check_minilm_engine

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (build-engine[rtx]) is not installed")


def _embeddings(model: onnx.ModelProto, minilm_onnx: Path) -> np.ndarray:
    import onnxruntime as ort

    from builder.intake.minilm import tokenizer_json_path
    from calib.data import vader_splits
    from calib.tokenize import encode

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    texts = [s.text for s in vader_splits().test[:16]]
    return np.concatenate([session.run(["sentence_embedding"], dict(f))[0]
                           for f in encode(texts, tokenizer_json_path(), max_length=128, batch_size=16)])


@pytest.mark.parametrize(("form", "weight_only", "weight"), [
    ("w8a8-int8-per-channel", False, RtnConfig(bits=8)),
    ("w4a8-int8-per-channel", False, RtnConfig(bits=4)),
    ("w4a16-int4-block128", True, RtnConfig(bits=4, block=128)),
    ("w4a16-int4-block32", True, RtnConfig(bits=4, block=32)),  # the finer blocks a small decoder needs
])
def test_minilm_weight_forms_build_with_tensorrt_rtx(minilm_onnx: Path, minilm_statistics: Any, tmp_path: Path,
                                                     form: str, weight_only: bool, weight: RtnConfig) -> None:
    report, statistics = minilm_statistics
    fp32 = onnx.load(str(minilm_onnx))
    roles = tuple(r for r in WEIGHT_GEMM_ROLES if r != Role.LM_HEAD)
    rule = Rule(select=Selector(roles=roles, optional=True), set=Settings(
        precision=Precision.INT8, weight=weight, activation=NoneConfig() if weight_only else None))
    result = quantize(fp32, report, resolve_recipe("int8-gemm", report).with_rules((rule,)), statistics)
    model = result.model.model
    int4 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    quantize_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(int4) == (36 if weight_only else 0) and (not quantize_nodes) == weight_only
    cosine = np.sum(_embeddings(fp32, minilm_onnx) * _embeddings(model, minilm_onnx), axis=1)
    assert float(np.mean(cosine)) > 0.85  # a 4-bit model, not noise
    path = tmp_path / form / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(result.model.serialize())
    check_minilm_engine(build_engine_dir(BuildInputs(model_path=path), OPTIONS, tmp_path / "engines" / form))
