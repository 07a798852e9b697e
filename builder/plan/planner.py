"""Planning stage: ``plan(report, recipe, statistics) -> QuantPlan``.

Decides, before any graph is touched, every quantized activation edge (its registered quantizer and the
parameters that quantizer decides from the Statistics), every INT8 weight (its weight quantizer), and the
precision of every node with a role plus the reason.

Placement follows TensorRT's rules: inputs of GEMMs are quantized (activation per tensor, weight per output
channel), GEMM outputs are not; one tensor has one scale, so consumers that share a tensor (the Q/K/V
projections of one LayerNorm output) share its Q/DQ and must agree on how it is quantized. The Q, K and V
operands of one attention share one scale (TensorRT's fused INT8 attention takes one); the softmax output P
never joins them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from typing import Any

import onnx
from msgspec.structs import replace
from onnx import numpy_helper

from builder.graph.report import GraphReport, Role
from builder.plan.artifact import ALL_CONSUMERS, ActivationEdge, NodePlan, QuantPlan, WeightEdge
from builder.quant.base import EdgeContext, Placement
from builder.quant.registry import activation_quantizer, config_to_dict, quantizer_of
from builder.recipes.loader import recipe_to_json
from builder.recipes.model import (
    ACT_GEMM_ROLES,
    NON_INT8_ROLES,
    OUTPUT_ROLES,
    WEIGHT_GEMM_ROLES,
    Precision,
    Recipe,
)
from builder.recipes.resolve import ResolvedNode, resolve
from calib.artifact_io import sha256_text
from calib.errors import CalibrationError, ConfigError, GraphError
from calib.schema import Schema, to_json
from calib.statistics import Statistics, TensorStatistics

logger = logging.getLogger(__name__)

BIAS_CORRECTION_NOTE = ("bias corrected after lowering: minus the mean INT8-minus-FP32 output error per channel on "
                        "the calibration data (sequential)")


@dataclass(frozen=True)
class _Request:
    tensor: str
    consumer: str  # node name, or ALL_CONSUMERS when the producer quantizes its output
    placement: Placement
    config: Schema


def _requests_for(node: ResolvedNode) -> list[_Request]:
    a, s = node.assignment, node.settings
    if s.precision != Precision.INT8:
        return []
    if a.role in NON_INT8_ROLES:
        raise ConfigError(f"node {a.node!r} ({a.role.value}) cannot run in INT8: residual adds and "
                          f"activation outputs stay 16/32-bit; set precision fp16 or fp32 ({node.precision_note})")
    assert s.activation is not None
    if a.role in WEIGHT_GEMM_ROLES:
        if a.weight is None or a.weight_axis is None or not a.inputs:
            raise GraphError(f"GEMM {a.node!r} ({a.role.value}) has no weight initializer the plan can quantize")
        requests = [_Request(a.inputs[0], a.node, Placement.WEIGHT_INPUT, s.activation)]
    elif a.role in ACT_GEMM_ROLES:
        requests = [_Request(t, a.node, Placement.OPERAND, s.activation) for t in a.inputs]
    elif a.role in OUTPUT_ROLES:
        requests = [_Request(a.outputs[0], ALL_CONSUMERS, Placement.OUTPUT, s.activation)]
    else:
        raise ConfigError(f"node {a.node!r}: role {a.role.value} has no INT8 form")
    quantizer = quantizer_of(s.activation)
    for request in requests:
        if request.placement not in quantizer.placements:  # type: ignore[union-attr]
            allowed = ", ".join(sorted(p.value for p in quantizer.placements))  # type: ignore[union-attr]
            raise ConfigError(f"node {a.node!r} ({a.role.value}): quantizer {quantizer.name!r} cannot quantize "
                              f"{request.placement.value.replace('_', ' ')} tensors (it applies to: {allowed})")
    return requests


def _merge(tensor: str, requests: list[_Request]) -> tuple[tuple[str, ...], Placement, Schema]:
    """One decision per tensor. A producer's request (every consumer) decides; otherwise configs must agree."""
    producer = [r for r in requests if r.consumer == ALL_CONSUMERS]
    lead = producer[0] if producer else requests[0]
    for other in requests:
        same = (type(other.config) is type(lead.config)) if producer else other.config == lead.config
        if not same:
            raise ConfigError(
                f"conflicting rules for tensor {tensor!r}: {lead.consumer} wants {_describe(lead.config)} but "
                f"{other.consumer} wants {_describe(other.config)}; one tensor has one scale, so make the rules "
                "for its consumers agree"
            )
    if producer:
        return (ALL_CONSUMERS,), Placement.OUTPUT, lead.config
    placements = {r.placement for r in requests}
    placement = Placement.WEIGHT_INPUT if placements == {Placement.WEIGHT_INPUT} else Placement.OPERAND
    return tuple(dict.fromkeys(r.consumer for r in requests)), placement, lead.config


def _describe(config: Schema) -> str:
    """``centered(range=max, percentile=99.99)``."""
    options = config_to_dict(config)
    name = options.pop("quantizer")
    return f"{name}({', '.join(f'{k}={v}' for k, v in options.items())})"


class MissingStatistics(CalibrationError):
    """The plan's activation quantizers need observer kinds the Statistics lack (``wanted``: tensor -> kinds).

    Not a user error: builder.pipeline.plan_model collects them from the calibration batches when it has them.
    """

    def __init__(self, wanted: Mapping[str, tuple[str, ...]], who: Sequence[str] = ()) -> None:
        self.wanted = dict(wanted)
        kinds = sorted({k for v in self.wanted.values() for k in v})
        super().__init__(f"the recipe needs {'/'.join(kinds)} statistics of {len(self.wanted)} tensors that the "
                         f"calibration did not collect ({'; '.join(who[:4])}{' ...' if len(who) > 4 else ''}); give "
                         "quantize the calibration-data flags the statistics were collected with (--calib-data, "
                         "--samples, --seed, --batch-size, --max-length) and it collects them in a second pass over "
                         "the same data")


def _check_observers(merged: Mapping[str, tuple[Any, Placement, Schema]], statistics: Statistics) -> None:
    """A CalibrationError naming every tensor the recipe quantizes that was not calibrated; else MissingStatistics
    when calibrated tensors lack observer kinds their quantizer needs (collected on demand by a second pass)."""
    missing: list[str] = []
    who: list[str] = []
    wanted: dict[str, tuple[str, ...]] = {}
    for tensor, (_, _, config) in merged.items():
        quantizer = quantizer_of(config)
        if _static_fixed(config):
            continue  # a fixed range needs no statistics
        if tensor not in statistics:
            missing.append(f"{tensor} (not calibrated)")
            continue
        have = statistics.tensors[tensor].observers
        lacking = tuple(k for k in quantizer.observers if k not in have)
        if lacking:
            wanted[tensor] = lacking
            who.append(f"{tensor}: {quantizer.name} needs {', '.join(lacking)}")
    if missing:
        raise CalibrationError(f"the calibration statistics lack {len(missing)} tensor(s) the recipe quantizes: "
                               + "; ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
                               + ". Calibrate this model again (build-engine calibrate MODEL -o FOLDER)")
    if wanted:
        raise MissingStatistics(wanted, who)


def _static_fixed(config: Schema) -> bool:
    return getattr(config, "range", None) == "fixed"


def _weight_access(model: onnx.ModelProto | None, report: GraphReport) -> dict[str, Callable[[], Any]]:
    if model is None:
        return {}
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, Callable[[], Any]] = {}
    for a in report.assignments:
        if a.weight is not None and a.weight in inits and a.weight_axis is not None:
            out[a.node] = functools.partial(_read_weight, inits[a.weight], a.weight_axis)
    return out


def _read_weight(init: onnx.TensorProto, axis: int) -> tuple[Any, int]:
    return numpy_helper.to_array(init), axis


def _decide(merged: Mapping[str, tuple[tuple[str, ...], Placement, Schema]], statistics: Statistics,
            weights: Mapping[str, Callable[[], Any]]) -> list[ActivationEdge]:
    edges = []
    for tensor, (consumers, placement, config) in merged.items():
        quantizer = activation_quantizer(quantizer_of(config).name)
        stats = statistics.tensors.get(tensor) or TensorStatistics.create(tensor, ())  # fixed ranges need none
        context = EdgeContext(tensor=tensor, placement=placement, consumers=consumers, statistics=stats,
                              weights={c: weights[c] for c in consumers if c in weights})
        params = quantizer.decide(context, config)
        edges.append(ActivationEdge(tensor=tensor, consumers=consumers, placement=placement, quantizer=quantizer.name,
                                    params=params, method=quantizer.describe(config, params)))
    return edges


def _p_operands(report: GraphReport) -> set[str]:
    """The softmax-output operands P of every P.V MatMul (they never share the Q/K/V scale)."""
    softmax_out = {t for a in report.by_role(Role.ATTN_SOFTMAX) for t in a.outputs}
    p: set[str] = set()
    for a in report.by_role(Role.ATTN_PV):
        operands = getattr(a, "operands", ())
        if operands:
            p.update(t for t, kind in zip(a.inputs, operands, strict=False) if kind == "p")
        else:
            p.update(t for t in a.inputs if t in softmax_out)
            if not p & set(a.inputs) and a.inputs:
                p.add(a.inputs[0])  # MatMul(P, V): P is the left operand
    return p


def _share_attention_scales(edges: list[ActivationEdge], report: GraphReport) -> list[ActivationEdge]:
    """One scale for the Q, K and V operands of each attention: the largest of their ranges."""
    by_node = {a.node: a for a in report.assignments}
    p_operands = _p_operands(report)
    groups: dict[int, list[int]] = {}
    for i, edge in enumerate(edges):
        joins = activation_quantizer(edge.quantizer).joins_scale_groups
        if edge.all_consumers or edge.tensor in p_operands or not joins:
            continue
        layers = {by_node[c].layer for c in edge.consumers if by_node[c].role in ACT_GEMM_ROLES}
        if len(layers) == 1 and None not in layers:
            groups.setdefault(int(next(iter(layers))), []).append(i)  # type: ignore[arg-type]
    out = list(edges)
    for layer, members in groups.items():
        amax = max(edges[i].params.amax for i in members)
        for i in members:
            out[i] = replace(edges[i], params=replace(edges[i].params, amax=amax),
                             scale_group=f"layer{layer}.attention_qkv")
    return out


def _reason(node: ResolvedNode, precision: Precision) -> str:
    role = node.assignment.role
    if precision == Precision.INT8:
        if node.settings.bias_correction and role in WEIGHT_GEMM_ROLES:
            return f"int8: {node.precision_note}; {BIAS_CORRECTION_NOTE}"
        return f"int8: {node.precision_note}"
    if precision in (Precision.FP16, Precision.BF16):
        return f"{precision.value} fallback: {node.precision_note}"
    if role in NON_INT8_ROLES and node.precision_rule is None:
        return "kept in model precision: residual stream and activation outputs stay high precision"
    return f"kept in model precision: {node.precision_note}"


def _node_plans(resolved: Mapping[str, ResolvedNode], recipe: Recipe, flops: Mapping[str, float]) -> list[NodePlan]:
    plans = []
    for name, node in resolved.items():
        precision = node.settings.precision or Precision.FP32
        reason = _reason(node, precision)
        if recipe.model_dtype == Precision.FP16:
            if precision == Precision.INT8:
                raise ConfigError(f"recipe {recipe.name!r}: model_dtype fp16 with INT8 nodes is not supported")
            precision, reason = Precision.FP16, f"fp16: recipe {recipe.name!r} converts the whole model"
        a = node.assignment
        plans.append(NodePlan(node=name, role=a.role.value, layer=a.layer, precision=precision, reason=reason,
                              gemm_flops=float(flops.get(name, 0.0))))
    return plans


def _weight_edges(resolved: Mapping[str, ResolvedNode]) -> list[WeightEdge]:
    weights = []
    for node in resolved.values():
        a, s = node.assignment, node.settings
        if s.precision == Precision.INT8 and a.role in WEIGHT_GEMM_ROLES:
            assert a.weight is not None and a.weight_axis is not None and s.weight is not None
            weights.append(WeightEdge(node=a.node, weight=a.weight, input=a.inputs[0], axis=a.weight_axis,
                                      quantizer=quantizer_of(s.weight).name, config=s.weight,
                                      path=a.weight_path, bias_correction=bool(s.bias_correction)))
    return weights


def _weight_path_problem(model: onnx.ModelProto | None, node: ResolvedNode) -> str | None:
    """Why the INT8 weight of a GEMM whose weight reaches it through other nodes cannot be written, or None.

    A 2-D Transpose (a tied LM head reading the embedding) or Identity keeps the weight exact and its channel
    axis known: the integer weight is dequantized in the initializer's layout and the path reads it. A split
    quantizer (PEG) rewrites the GEMM's weight itself, so it needs the weight as the GEMM's own input.
    """
    a, s = node.assignment, node.settings
    if not a.weight_path or s.precision != Precision.INT8 or a.role not in WEIGHT_GEMM_ROLES:
        return None
    assert s.activation is not None
    if activation_quantizer(quantizer_of(s.activation).name).lowering_pass == "split":
        return (f"its weight reaches it through {', '.join(a.weight_path)}, which quantizer "
                f"{quantizer_of(s.activation).name!r} cannot split")
    if model is None:
        return None
    ops = {n.name: n for n in model.graph.node if n.name in set(a.weight_path)}
    for name in a.weight_path:
        op = ops.get(name)
        perm = [] if op is None else next((list(x.ints) for x in op.attribute if x.name == "perm"), [1, 0])
        if op is None or not (op.op_type == "Identity" or (op.op_type == "Transpose" and perm in ([1, 0], []))):
            kind = "a missing node" if op is None else op.op_type
            return f"its weight reaches it through {name!r} ({kind}); only a 2-D Transpose or Identity keeps it exact"
    return None


def _keep_float_where_weights_cannot_be_written(resolved: dict[str, ResolvedNode],
                                                model: onnx.ModelProto | None) -> None:
    for name, node in resolved.items():
        problem = _weight_path_problem(model, node)
        if problem is not None:
            logger.warning("GEMM %s stays in model precision: %s", name, problem)
            resolved[name] = dataclass_replace(node, settings=dataclass_replace(node.settings,
                                                                                precision=Precision.FP32),
                                               precision_rule=None, precision_note=f"INT8 refused: {problem}")


def statistics_digest(statistics: Statistics) -> str:
    """What the plan's ranges came from: the model, the data digest and the observer options."""
    meta = statistics.meta
    return sha256_text(to_json({"model": meta.model_sha256, "data": meta.data_digest, "options": meta.options}))


def plan(report: GraphReport, recipe: Recipe, statistics: Statistics, *,
         flagged: Sequence[int] | None = None, flops: Mapping[str, float] | None = None, seq_len: int = 128,
         model: onnx.ModelProto | None = None) -> QuantPlan:
    """Decide every quantized edge, INT8 weight and node precision of ``report`` under ``recipe``.

    ``flagged`` are the layers the outlier report flags (calib.outliers.OutlierReport.flagged_layers; needed
    when the recipe selects flagged layers). ``flops`` (builder.plan.flops.gemm_flops) gives the INT8
    GEMM-FLOP share. ``model`` lets quantizers that look at the consumers' weights read them.
    """
    flagged_t = None if flagged is None else tuple(sorted({int(i) for i in flagged}))
    resolved = resolve(recipe, report, flagged_t)
    _keep_float_where_weights_cannot_be_written(resolved, model)
    by_tensor: dict[str, list[_Request]] = {}
    for node in resolved.values():
        for request in _requests_for(node):
            by_tensor.setdefault(request.tensor, []).append(request)
    merged = {tensor: _merge(tensor, requests) for tensor, requests in by_tensor.items()}
    _check_observers(merged, statistics)
    edges = _share_attention_scales(_decide(merged, statistics, _weight_access(model, report)), report)
    if flops is None:
        logger.warning("no GEMM FLOP counts given: the plan's INT8 GEMM-FLOP share will read 0")
    return QuantPlan(
        model_name=report.model_name, recipe_name=recipe.name, recipe_sha256=sha256_text(recipe_to_json(recipe)),
        statistics_digest=statistics_digest(statistics), model_dtype=recipe.model_dtype,
        activations=tuple(edges), weights=tuple(_weight_edges(resolved)),
        nodes=tuple(_node_plans(resolved, recipe, flops or {})), flagged_layers=flagged_t or (), seq_len=seq_len)

