"""Lowering stage: ``lower(model, plan, weights, variant) -> QuantizedModel``.

Writes exactly what the QuantPlan and the WeightSet say. Passes, each followed by the ONNX checker and the
Q/DQ invariants (builder.lower.checks):

    0. opset     default-domain opset raised to 19, or 21 for block-wise INT4 weights (ONNX version converter
                 where ops changed)
    1. fold      activation quantizers that fold scales into producers (HERO FWQ)
    2. split     activation quantizers that split consumers (Bondarenko PEG)
    3. qdq       every other activation quantizer's rule (Q/DQ pairs), then the integer weights of every
                 planned GEMM (each weight quantizer's own rule), then what must follow the weights
                 (centered offsets folded into biases) and the WeightSet's bias shifts
    4. fallback  FP16/BF16 Cast islands (and the per-node precision list for weakly typed TensorRT 10)
    5. fp16      whole-graph FP16 conversion when the plan's model dtype is fp16 (the FP16 baseline)
    6. plugins   only for variant="plugin": LN->Q and Softmax->Q swapped for the fused plugin nodes

Each activation edge is lowered by the rule of the quantizer it names (builder.quant.registry); the pass
of a rule is its quantizer's ``lowering_pass``. The same model, plan and WeightSet always give
byte-identical output (:meth:`QuantizedModel.serialize`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import onnx

from builder.lower.checks import check_model
from builder.lower.context import LoweringContext
from builder.lower.fallback import convert_fp16, lower_fallback
from builder.lower.graph_edit import GraphEditor
from builder.lower.opset import default_opset, required_opset, upgrade_opset
from builder.plan.artifact import QuantPlan
from builder.quant.registry import activation_quantizer
from builder.recipes.model import Precision
from builder.weights.weightset import WeightSet
from calib.errors import BackendUnavailable, BuildError, ConfigError

logger = logging.getLogger(__name__)

VARIANTS = ("portable", "plugin")
PASSES = ("fold", "split", "qdq")
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


def _checked(ed: GraphEditor, name: str) -> None:
    ed.finish()
    check_model(ed.model, name)
    logger.info("lowering pass %s done (%d nodes)", name, len(ed.graph.node))


def plugin_pass(model: onnx.ModelProto) -> onnx.ModelProto:
    """The plugin variant's fusion pass (LN->Q and Softmax->Q to fused plugin nodes)."""
    try:
        from builder.lower.fuse_plugins import fuse_plugins
    except ImportError as exc:
        raise BackendUnavailable(f"the plugin variant needs the plugin fusion pass: {exc}") from exc
    result = fuse_plugins(model)
    fused: onnx.ModelProto = result.model
    return fused


def _write_weights(ctx: LoweringContext) -> None:
    """The integer weight of every planned GEMM that no rule has written, in plan order."""
    edges = {a.tensor: a for a in ctx.plan.activations}
    for w in ctx.plan.weights:
        if w.node in ctx.rewritten:
            continue
        node = ctx.ed.node(w.path[0] if w.path else w.node)  # a tied weight: the path's first node reads it
        index = next((i for i, t in enumerate(node.input) if t == w.weight), None)
        if index is None:
            raise BuildError(f"GEMM {w.node!r} does not read its planned weight {w.weight!r}")
        edge = edges.get(w.input)
        views = [""] if edge is None else list(_view_names(edge, ctx, w.weight, w.axis))
        if len(views) != 1:
            raise BuildError(f"GEMM {w.node!r}: its input quantizer makes {len(views)} weight views, which only its "
                             "own lowering rule can write")
        node.input[index] = ctx.weight_tensor(w.node, w.weight, w.axis, views[0])


def _view_names(edge: Any, ctx: LoweringContext, weight: str, axis: int) -> list[str]:
    value = ctx.ed.initializer(weight)
    if value is None:
        raise BuildError(f"weight {weight!r} is not a constant initializer")
    return list(activation_quantizer(edge.quantizer).weight_views(edge.params, value, axis))


def _apply_bias_shifts(ctx: LoweringContext) -> None:
    from builder.weights.bias_correction import set_bias

    for node_name in sorted(ctx.weights.bias_shifts):
        found = ctx.ed.bias_add(ctx.ed.node(node_name))
        if found is None:
            raise BuildError(f"GEMM {node_name!r} has a bias shift but no constant bias Add")
        set_bias(ctx.ed.model, found[1], ctx.weights.bias_shifts[node_name])  # in place: the editor's index holds


def _lower_passes(ctx: LoweringContext) -> None:
    by_pass: dict[str, list[Any]] = {name: [] for name in PASSES}
    for edge in ctx.plan.activations:
        quantizer = activation_quantizer(edge.quantizer)
        name = quantizer.lowering_pass
        if name not in by_pass:
            raise BuildError(f"quantizer {edge.quantizer!r} names lowering pass {name!r}; passes: {', '.join(PASSES)}")
        by_pass[name].append((quantizer, edge))
    for name in PASSES:
        if name != "qdq" and not by_pass[name]:
            continue
        for quantizer, edge in by_pass[name]:
            quantizer.lower(ctx, edge)
        if name == "qdq":
            _write_weights(ctx)
            ctx.run_after_weights()
            if ctx.weights.bias_shifts:
                _apply_bias_shifts(ctx)
        _checked(ctx.ed, name)


def lower(model: onnx.ModelProto, plan: QuantPlan, weights: WeightSet, variant: str = "portable") -> QuantizedModel:
    """Apply ``plan`` and ``weights`` to a copy of ``model``."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant {variant!r} not supported; use one of {', '.join(VARIANTS)}")
    if default_opset(model) < MIN_QDQ_OPSET:
        raise BuildError(f"the model's default opset {default_opset(model)} is below {MIN_QDQ_OPSET}, which "
                         "per-channel DequantizeLinear needs; re-export with opset 13 or newer")
    work = upgrade_opset(model, required_opset(plan))
    if work is model:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    editor = GraphEditor(work)
    if editor.inline_constant_aliases():
        logger.info("weights read through Identity nodes now read their initializers directly")
    ctx = LoweringContext(editor, plan, weights)
    _lower_passes(ctx)
    ed = ctx.ed
    precision = {w.node: "int8" for w in plan.weights}
    precision.update({n.node: "int8" for n in plan.nodes if n.precision == Precision.INT8})
    if plan.model_dtype == Precision.FP16:
        convert_fp16(ed)
        _checked(ed, "fp16")
        precision = {n.node: "fp16" for n in plan.nodes}
    else:
        fallback = lower_fallback(ed, plan)
        if fallback:
            _checked(ed, "fallback")
        precision.update(fallback)
    result = ed.model
    if variant == "plugin":
        result = plugin_pass(result)
        check_model(result, "plugins")
    return QuantizedModel(model=result, plan=plan, variant=variant, precision=dict(sorted(precision.items())))
