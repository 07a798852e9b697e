"""Evaluation stage: ``evaluate(fp32_model, model, report, data) -> AccuracyReport`` on ONNX Runtime (CPU).

Any model: every float output against FP32 (cosine, relative error; top-1 and KL for logits); sentence
encoders add the VADER probe, Lee Spearman and embedding cosine; causal language models add perplexity over
fixed windows, next-token agreement and KL, and greedy generation through the KV cache. Also the INT8
GEMM-FLOP share, the per-layer residual-stream error, and ONNX Runtime's ``quantize_static`` as the peer
baseline (:mod:`builder.evaluate.ort_baseline`). :func:`builder.evaluate.tokenizer.model_text_encoder` is the
checked text encoder shared with calibration.
"""

from builder.evaluate.evaluate import EvalData, evaluate, load_eval_data, reference_report
from builder.evaluate.reference import Reference, prepare_reference
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
    "reference_report",
]
