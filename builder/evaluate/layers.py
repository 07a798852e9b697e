"""Evaluation stage: the per-layer error table that locates where quantization damages the model.

For each transformer layer two residual-stream tensors are compared with FP32 on the same sentences:
after the attention sub-block and after the whole block. Post-LN (BERT) blocks carry the stream in the
LayerNorm outputs (``attn_ln``, ``ffn_ln``); pre-LN (GPT) blocks in the residual sums
(``attn_residual``, ``ffn_residual``); Llama-style decoders are pre-norm too. A parallel block (GPT-NeoX,
Falcon) has one residual Add for attention and MLP together: the block point only. Padding tokens are excluded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from builder.evaluate.metrics import ErrorAccumulator
from builder.evaluate.report import LayerError
from builder.evaluate.runner import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, Feeds, OrtRunner, batches, tensor_names
from builder.graph.report import GraphReport, Role

logger = logging.getLogger(__name__)

PRE_NORM_ARCHITECTURES = ("gpt", "llama")  # the residual stream is the residual sums, not the norm outputs
# (point, post-LN role, pre-LN role)
_POINT_ROLES = (
    ("attn", Role.ATTN_LN, Role.ATTN_RESIDUAL),
    ("block", Role.FFN_LN, Role.FFN_RESIDUAL),
)


def stream_tensors(report: GraphReport) -> tuple[tuple[int, str, str], ...]:
    """``(layer, point, tensor)`` for every layer and sub-block point the report names, in layer order."""
    pre_ln = report.architecture in PRE_NORM_ARCHITECTURES
    rows = []
    for layer in range(report.num_layers):
        # a parallel block (GPT-NeoX, Falcon) adds attention and MLP to the stream in one residual Add: the block
        parallel = (pre_ln and report.find(Role.FFN_RESIDUAL, layer) is None
                    and report.find(Role.FC2, layer) is not None)
        for point, post_role, pre_role in _POINT_ROLES:
            if parallel and point == "attn":
                continue
            role = Role.ATTN_RESIDUAL if parallel else pre_role if pre_ln else post_role
            found = report.find(role, layer)
            if found is not None and found.outputs:
                rows.append((layer, point, found.outputs[0]))
    return tuple(rows)


def valid_tokens(x: npt.NDArray[Any], valid: npt.NDArray[np.bool_]) -> npt.NDArray[Any]:
    """The rows of stream tensor ``x`` at the non-padding tokens of ``valid`` [batch, seq]: ``x`` laid out
    [batch, seq, ...] or flattened [batch * seq, ...] (OPT-style blocks reshape the stream to 2-D); any other
    layout gives every value (padding included, as the FP32 side is read the same way)."""
    if x.ndim >= 2 and x.shape[:2] == valid.shape:
        return x[valid]
    if x.ndim >= 1 and x.shape[0] == valid.size:
        return x[valid.reshape(-1)]
    return x.reshape(-1)


def layer_errors(
    fp32_model: onnx.ModelProto,
    model: onnx.ModelProto,
    report: GraphReport,
    texts: Sequence[str],
    tokenizer_json: Path | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> tuple[tuple[LayerError, ...], tuple[str, ...]]:
    """Relative and max-abs error of each residual-stream tensor vs FP32, plus warnings for missing tensors."""
    feeds = ((feed, feed["attention_mask"]) for _, feed in batches(texts, tokenizer_json, batch_size, max_length))
    return layer_errors_on(fp32_model, model, report, feeds)


def layer_errors_on(
    fp32_model: onnx.ModelProto,
    model: onnx.ModelProto,
    report: GraphReport,
    feeds: Iterable[tuple[Feeds, npt.NDArray[Any]]],
) -> tuple[tuple[LayerError, ...], tuple[str, ...]]:
    """:func:`layer_errors` over ready ``(feeds, attention mask [batch, seq])`` batches (any model)."""
    rows = stream_tensors(report)
    present = tensor_names(model)
    wanted = [t for _, _, t in rows if t in present]
    warnings = tuple(
        f"layer {layer} {point}: tensor {tensor!r} is not in the evaluated model; its error is not reported"
        for layer, point, tensor in rows
        if tensor not in present
    )
    for message in warnings:
        logger.warning(message)
    acc = {t: ErrorAccumulator() for t in wanted}
    if wanted:
        # one session at a time: the FP32 tensors (non-padding tokens only) are kept, then the model runs
        batches_ = list(feeds)
        ref_runner = OrtRunner(fp32_model, extra_outputs=wanted)
        reference = [[valid_tokens(r, np.asarray(mask).astype(bool)) for r in ref_runner.run(feed, wanted)]
                     for feed, mask in batches_]
        del ref_runner
        runner = OrtRunner(model, extra_outputs=wanted)
        for (feed, mask), ref in zip(batches_, reference, strict=True):
            valid = np.asarray(mask).astype(bool)
            got = runner.run(feed, wanted)
            for name, r, g in zip(wanted, ref, got, strict=True):
                acc[name].add(valid_tokens(g.astype(np.float32), valid), r)
    table = tuple(
        LayerError(
            layer=layer,
            point=point,
            tensor=tensor,
            relative_error=acc[tensor].relative_error if tensor in acc else None,
            max_abs_error=acc[tensor].max_abs if tensor in acc else None,
        )
        for layer, point, tensor in rows
    )
    return table, warnings


def format_layer_table(errors: Sequence[LayerError]) -> str:
    """A plain-text table: one line per layer, relative error after attention and after the block."""
    layers = sorted({e.layer for e in errors})
    by_key = {(e.layer, e.point): e for e in errors}
    lines = [f"{'layer':>5}  {'rel err attn':>12}  {'rel err block':>13}  {'max abs block':>13}"]
    for layer in layers:
        attn = by_key.get((layer, "attn"))
        block = by_key.get((layer, "block"))
        cells = [
            _fmt(attn.relative_error if attn else None, 12),
            _fmt(block.relative_error if block else None, 13),
            _fmt(block.max_abs_error if block else None, 13),
        ]
        lines.append(f"{layer:>5}  " + "  ".join(cells))
    return "\n".join(lines)


def _fmt(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.4f}"
