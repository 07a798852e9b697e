"""Evaluation stage: ``evaluate(fp32_model, model, report, data) -> AccuracyReport`` on ONNX Runtime (CPU).

Fidelity (cosine of pooled embeddings to FP32, per-layer residual-stream error), task accuracy (a logistic
regression probe on VADER movie sentences), similarity (Spearman on the Lee rated pairs), the INT8 GEMM-FLOP
share, and ONNX Runtime's ``quantize_static`` as the peer baseline (:mod:`builder.evaluate.ort_baseline`).
"""

from builder.evaluate.evaluate import EvalData, Reference, evaluate, load_eval_data, prepare_reference
from builder.evaluate.report import AccuracyReport, LayerError
from builder.evaluate.runner import OrtRunner, embed

__all__ = [
    "AccuracyReport",
    "EvalData",
    "LayerError",
    "OrtRunner",
    "Reference",
    "embed",
    "evaluate",
    "load_eval_data",
    "prepare_reference",
]
