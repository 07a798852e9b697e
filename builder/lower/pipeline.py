"""Lowering stage: ``lower(model, plan, variant) -> QuantizedModel``.

Passes, each followed by the ONNX checker and the Q/DQ invariants (:mod:`builder.lower.checks`):

    0. opset     default-domain opset raised to 19 (ONNX version converter where ops changed)
    1. fwq       HERO feature-wise scales folded into LayerNorm gamma/beta and the next weights' rows
    2. peg       Bondarenko per-embedding-group split of GEMM inputs
    3. qdq       per-tensor activation Q/DQ and INT8 per-channel weights behind DequantizeLinear; centered
                 edges get a Sub before QuantizeLinear and their offset folded into the GEMM biases
    4. fallback  FP16/BF16 Cast islands (and the per-node precision list for weakly typed TensorRT 10)
    5. fp16      whole-graph FP16 conversion when the plan's model dtype is fp16 (the FP16 baseline)
    6. plugins   only for variant="plugin": LN->Q and Softmax->Q swapped for the fused plugin nodes

Bias correction needs calibration data, so it is a separate stage after these passes
(:func:`builder.lower.quantize.lower_with_correction`, :mod:`builder.lower.bias_correction`).

The same model and plan always give byte-identical output (:meth:`QuantizedModel.serialize`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx

from builder.lower.center import fold_offsets
from builder.lower.checks import check_model
from builder.lower.fallback import convert_fp16, lower_fallback
from builder.lower.fold import fold_feature_scales
from builder.lower.graph_edit import GraphEditor
from builder.lower.opset import default_opset, upgrade_opset
from builder.lower.peg import rewrite_peg
from builder.lower.qdq import lower_tensor_activations, lower_weights
from builder.plan.artifact import QuantPlan
from builder.recipes.model import Precision
from calib.errors import BackendUnavailable, BuildError, ConfigError

logger = logging.getLogger(__name__)

VARIANTS = ("portable", "plugin")
MIN_QDQ_OPSET = 13  # per-axis DequantizeLinear


@dataclass(frozen=True, kw_only=True)
class QuantizedModel:
    """The lowered Q/DQ graph, the plan it implements and the per-node precision list."""

    model: onnx.ModelProto
    plan: QuantPlan
    variant: str
    precision: dict[str, str] = field(default_factory=dict)  # node -> int8/fp16/bf16 (weakly typed builds)

    def serialize(self) -> bytes:
        """Deterministic protobuf bytes of the model."""
        return bytes(self.model.SerializeToString(deterministic=True))


def _run_pass(ed: GraphEditor, name: str, fn: Callable[[], Any]) -> Any:
    nodes_before = len(ed.graph.node)
    result = fn()
    if isinstance(result, (set, dict)) and not result and len(ed.graph.node) == nodes_before:
        return result  # the pass had nothing to do
    ed.finish()
    check_model(ed.model, name)
    logger.info("lowering pass %s done (%d nodes)", name, len(ed.graph.node))
    return result


def plugin_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    """The plugin variant's fusion pass (LN->Q and Softmax->Q to fused plugin nodes)."""
    try:
        from builder.lower.fuse_plugins import fuse_plugins
    except ImportError as exc:
        raise BackendUnavailable(f"the plugin variant needs the plugin fusion pass: {exc}") from exc
    result = fuse_plugins(model)
    fused: onnx.ModelProto = result.model
    return fused


def lower(model: onnx.ModelProto, plan: QuantPlan, variant: str = "portable") -> QuantizedModel:
    """Apply ``plan`` to a copy of ``model``."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant {variant!r} not supported; use one of {', '.join(VARIANTS)}")
    if default_opset(model) < MIN_QDQ_OPSET:
        raise BuildError(f"the model's default opset {default_opset(model)} is below {MIN_QDQ_OPSET}, which "
                         "per-channel DequantizeLinear needs; re-export with opset 13 or newer")
    work = upgrade_opset(model)
    if work is model:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    ed = GraphEditor(work)
    folded = _run_pass(ed, "fwq", lambda: fold_feature_scales(ed, plan))
    split = _run_pass(ed, "peg", lambda: rewrite_peg(ed, plan))
    del folded  # folded GEMMs are quantized like any other: their weight input now is the folded copy

    def qdq() -> None:
        lower_tensor_activations(ed, plan)
        lower_weights(ed, plan, skip=split)
        fold_offsets(ed, plan)

    _run_pass(ed, "qdq", qdq)
    precision = {w.node: "int8" for w in plan.weights}
    precision.update({n.node: "int8" for n in plan.nodes if n.precision == Precision.INT8})
    if plan.model_dtype == Precision.FP16:
        _run_pass(ed, "fp16", lambda: convert_fp16(ed))
        precision = {n.node: "fp16" for n in plan.nodes}
    else:
        precision.update(_run_pass(ed, "fallback", lambda: lower_fallback(ed, plan)))
    result = ed.model
    if variant == "plugin":
        result = plugin_pass(result)
        check_model(result, "plugins")
    return QuantizedModel(model=result, plan=plan, variant=variant, precision=dict(sorted(precision.items())))
