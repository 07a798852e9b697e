"""The weight quantizers through the library pipeline on the real MiniLM (slow: OPTQ and GPFQ passes).

Calibration: the shared 32 VADER calibration sentences (conftest); held-out: 64 test-split sentences. W4A16 (INT4
blocks of 128, float activations): OPTQ and GPFQ clearly above RTN in sentence-embedding cosine to FP32; W4A8 with
AXE (P = 16, T = 128): the verifier proves every GEMM, while the same OPTQ without AXE can overflow.
``make bench`` (bench/weights.py) measures all of it on the full splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from builder.pipeline import quantize, resolve_recipe
from builder.quant.gpfq import GpfqConfig
from builder.quant.none import NoneConfig
from builder.quant.optq import OptqConfig
from builder.quant.rtn import RtnConfig
from builder.recipes.model import WEIGHT_GEMM_ROLES, Rule, Selector, Settings
from builder.verify.accumulator import AccumulatorSpec, verify_model
from calib.schema import Schema


def _embeddings(model: onnx.ModelProto, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort

    from builder.intake.minilm import tokenizer_json_path
    from calib.tokenize import encode

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out = np.concatenate([session.run(["sentence_embedding"], dict(f))[0]
                          for f in encode(texts, tokenizer_json_path(), max_length=128, batch_size=16)])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.slow
def test_optq_and_gpfq_beat_rtn_at_w4_and_axe_is_proved(minilm_onnx: Path, minilm_statistics: Any) -> None:
    from builder.intake.minilm import tokenizer_json_path
    from calib.data import calibration_texts, vader_splits
    from calib.tokenize import encode

    report, statistics = minilm_statistics
    fp32 = onnx.load(str(minilm_onnx))
    feeds = list(encode(calibration_texts("vader", 32), tokenizer_json_path(), max_length=128, batch_size=16))
    texts = [s.text for s in vader_splits().test[:64]]
    reference = _embeddings(fp32, texts)
    roles = tuple(sorted(WEIGHT_GEMM_ROLES, key=lambda r: r.value))

    def run(weight: Schema, weight_only: bool) -> onnx.ModelProto:
        rule = Rule(select=Selector(roles=roles, optional=True),
                    set=Settings(weight=weight, activation=NoneConfig() if weight_only else None))
        recipe = resolve_recipe("int8-gemm", report).with_rules((rule,))
        model: onnx.ModelProto = quantize(fp32, report, recipe, statistics, feeds=feeds).model.model
        return model

    def cosine(model: onnx.ModelProto) -> float:
        return float(np.mean(np.sum(reference * _embeddings(model, texts), axis=1)))

    rtn = cosine(run(RtnConfig(bits=4, block=128), True))
    assert cosine(run(OptqConfig(bits=4, block=128), True)) > rtn + 0.02
    assert cosine(run(GpfqConfig(bits=4, block=128), True)) > rtn + 0.02
    spec = AccumulatorSpec(accumulator_bits=16, tile=128)
    assert not verify_model(run(OptqConfig(bits=4), False), spec).proved
    proved = verify_model(run(OptqConfig(bits=4, accumulator_bits=16, tile=128), False), spec)
    assert proved.proved and len(proved.gemms) == 36
