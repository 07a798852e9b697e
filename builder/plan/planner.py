"""Planning stage: ``plan(report, recipe, ranges) -> QuantPlan``.

Decides, before any graph is touched, every quantized activation edge (with its scheme, range and the
nodes that read it), every INT8 weight, and the precision of every node with a role plus the reason.

Placement follows TensorRT's rules (PLATFORM.md section 4): inputs of GEMMs are quantized (activation per
tensor, weight per output channel), GEMM outputs are not; one tensor has one scale, so consumers that share
a tensor (Q/K/V projections of one LayerNorm output) share its Q/DQ and must agree on how it is quantized.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from builder.graph.report import GraphReport, RoleAssignment
from builder.plan.artifact import ALL_CONSUMERS, ActivationQuant, NodePlan, QuantPlan, WeightQuant
from builder.plan.ranges import RangeSource, centered_range, feature_scales, peg_groups
from builder.recipes.loader import recipe_to_json
from builder.recipes.model import (
    ACT_GEMM_ROLES,
    NON_INT8_ROLES,
    OUTPUT_ROLES,
    WEIGHT_GEMM_ROLES,
    Precision,
    Recipe,
    Scheme,
    Settings,
)
from builder.recipes.resolve import ResolvedNode, resolve
from calib.artifact_io import sha256_text
from calib.errors import ConfigError, GraphError
from calib.range_table import RangeTable

logger = logging.getLogger(__name__)

# The settings fields that decide how one tensor is quantized; requests for one tensor must agree on them.
_QUANT_FIELDS = ("scheme", "range", "percentile", "fixed_amax", "groups", "alpha", "center")


@dataclass(frozen=True)
class _Request:
    tensor: str
    consumer: str  # node name, or ALL_CONSUMERS when the producer quantizes its output
    settings: Settings


# Bondarenko MP flags a layer when its FFN output h or FFN residual sum y (outlier-report roles "fc2" and
# "ffn_residual") has max|x| at least this many times its 99.99th percentile: a few structured outlier
# values own most of the INT8 range (METHODS.md section 3.1). On all-MiniLM-L6-v2 this flags layers 0-2,
# the three layers whose FFN is most sensitive to INT8 (measured by leaving one layer's FFN in FP16).
MP_OUTLIER_RATIO = 10.0
MP_ROLES = ("fc2", "ffn_residual")


BIAS_CORRECTION_NOTE = ("bias corrected after lowering: minus the mean INT8-minus-FP32 output error per channel on "
                        "the calibration data (sequential)")


def flagged_layers(outliers: Any) -> tuple[int, ...] | None:
    """Layers flagged by the outlier information.

    Accepted: a collection of layer indices; an object with ``flagged_layers``; or an outlier report with
    ``rows`` (calib.outliers.OutlierReport), flagged by :data:`MP_OUTLIER_RATIO` on :data:`MP_ROLES`.
    """
    if outliers is None:
        return None
    rows = getattr(outliers, "rows", None)
    if rows is not None:
        return tuple(sorted({int(r.layer) for r in rows if r.layer is not None and r.role in MP_ROLES
                             and r.max_over_p9999 >= MP_OUTLIER_RATIO}))
    layers = getattr(outliers, "flagged_layers", outliers)
    if callable(layers):
        layers = layers()
    try:
        return tuple(sorted({int(i) for i in layers}))
    except (TypeError, ValueError):
        raise ConfigError(f"outlier information {outliers!r} does not name flagged layers (integers)") from None


def _key(settings: Settings, scheme_only: bool) -> tuple[Any, ...]:
    fields = ("scheme",) if scheme_only else _QUANT_FIELDS
    return tuple(getattr(settings, f) for f in fields if not (f == "groups" and settings.scheme != Scheme.PEG)
                 and not (f == "alpha" and settings.scheme != Scheme.FEATURE))


def _requests_for(node: ResolvedNode) -> list[_Request]:
    a, s = node.assignment, node.settings
    if s.precision != Precision.INT8:
        return []
    if a.role in NON_INT8_ROLES:
        raise ConfigError(f"node {a.node!r} ({a.role.value}) cannot run in INT8: the residual stream and "
                          f"activation outputs stay 16/32-bit; set precision fp16 or fp32 ({node.precision_note})")
    if a.role in WEIGHT_GEMM_ROLES:
        if a.weight is None or a.weight_axis is None or not a.inputs:
            raise GraphError(f"GEMM {a.node!r} ({a.role.value}) has no weight initializer the plan can quantize")
        return [_Request(a.inputs[0], a.node, s)]
    if s.center:
        raise ConfigError(f"node {a.node!r} ({a.role.value}): center folds the shift into a GEMM bias, so it applies "
                          "to weight-GEMM inputs only (roles qkv, q_proj, k_proj, v_proj, attn_out, fc1, fc2, gemm)")
    if a.role in ACT_GEMM_ROLES:
        if s.scheme != Scheme.TENSOR:
            raise ConfigError(f"node {a.node!r} ({a.role.value}): scheme {s.scheme.value if s.scheme else None} "
                              "needs a weight GEMM consumer; batched attention MatMuls take scheme tensor")
        return [_Request(t, a.node, s) for t in a.inputs]
    if a.role in OUTPUT_ROLES:
        if s.scheme == Scheme.PEG:
            raise ConfigError(f"node {a.node!r} ({a.role.value}): scheme peg applies to GEMM inputs only")
        return [_Request(a.outputs[0], ALL_CONSUMERS, s)]
    raise ConfigError(f"node {a.node!r}: role {a.role.value} has no INT8 form")


def _describe(settings: Settings) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.to_dict().items() if k in _QUANT_FIELDS)


def _merge(tensor: str, requests: list[_Request]) -> tuple[tuple[str, ...], Settings]:
    """One decision per tensor. A producer's request (every consumer) decides the range; schemes must agree."""
    producer = [r for r in requests if r.consumer == ALL_CONSUMERS]
    lead = producer[0] if producer else requests[0]
    for other in requests:
        if _key(other.settings, scheme_only=bool(producer)) != _key(lead.settings, scheme_only=bool(producer)):
            raise ConfigError(
                f"conflicting rules for tensor {tensor!r}: {lead.consumer} wants ({_describe(lead.settings)}) but "
                f"{other.consumer} wants ({_describe(other.settings)}); one tensor has one scale, so make the rules "
                "for its consumers agree"
            )
    consumers = (ALL_CONSUMERS,) if producer else tuple(dict.fromkeys(r.consumer for r in requests))
    return consumers, lead.settings


def _activation(tensor: str, consumers: tuple[str, ...], s: Settings, source: RangeSource) -> ActivationQuant:
    assert s.scheme is not None
    if s.scheme == Scheme.FEATURE:
        assert s.alpha is not None
        scale, amax = feature_scales(source.stats(tensor, "channel_amax"), s.alpha)
        return ActivationQuant(tensor=tensor, consumers=consumers, scheme=s.scheme, amax=amax,
                               method=f"feature-max:alpha={s.alpha}", feature_scale=scale)
    if s.scheme == Scheme.PEG:
        assert s.groups is not None
        if consumers == (ALL_CONSUMERS,):
            raise ConfigError(f"tensor {tensor!r}: scheme peg splits GEMM inputs; it cannot quantize every consumer")
        groups = peg_groups(tensor, source.stats(tensor, "dim_min"), source.stats(tensor, "dim_max"), s.groups)
        return ActivationQuant(tensor=tensor, consumers=consumers, scheme=s.scheme,
                               amax=max(g.amax for g in groups), method=f"peg:K={s.groups}", groups=groups)
    amax, method = source.amax(tensor, s)
    if s.center:
        offset, half = centered_range(amax, *source.observed(tensor))
        if half > 0.0:
            return ActivationQuant(tensor=tensor, consumers=consumers, scheme=s.scheme, amax=half,
                                   method=f"{method}+center", offset=offset)
    return ActivationQuant(tensor=tensor, consumers=consumers, scheme=s.scheme, amax=amax, method=method)


def _check_folding(act: ActivationQuant, by_node: Mapping[str, RoleAssignment]) -> None:
    if act.scheme != Scheme.FEATURE or act.all_consumers:
        return
    for consumer in act.consumers:
        role = by_node[consumer].role
        if role not in WEIGHT_GEMM_ROLES:
            raise ConfigError(f"tensor {act.tensor!r}: scheme feature folds into the next weight's rows, but "
                              f"consumer {consumer!r} ({role.value}) has no weight")


def _share_attention_scales(activations: list[ActivationQuant], by_node: Mapping[str, RoleAssignment]
                             ) -> list[ActivationQuant]:
    """One scale for the Q, K and V operands of each attention (TensorRT's INT8 attention pattern,
    PLATFORM.md section 4): the largest of their ranges. Softmax outputs keep their own fixed scale."""
    groups: dict[int, list[int]] = {}
    for i, act in enumerate(activations):
        if act.all_consumers or act.scheme != Scheme.TENSOR:
            continue
        layers = {by_node[c].layer for c in act.consumers if by_node[c].role in ACT_GEMM_ROLES}
        layer = next(iter(layers)) if len(layers) == 1 else None
        if layer is not None:
            groups.setdefault(layer, []).append(i)
    out = list(activations)
    for layer, members in groups.items():
        amax = max(activations[i].amax for i in members)
        for i in members:
            out[i] = replace(activations[i], amax=amax, scale_group=f"layer{layer}.attention_qkv")
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


def plan(report: GraphReport, recipe: Recipe, ranges: RangeTable | Sequence[RangeTable], *,
         outliers: Collection[int] | Any = None, flops: Mapping[str, float] | None = None,
         seq_len: int = 128) -> QuantPlan:
    """Decide every quantized edge, INT8 weight and node precision of ``report`` under ``recipe``.

    ``ranges`` is one RangeTable or several (e.g. one per range method): a rule asking for a method picks the
    table whose range of that tensor used it. ``outliers`` are the layers the outlier report flags (a
    collection of ints or an object with ``flagged_layers``). ``flops`` (see :func:`builder.plan.flops.gemm_flops`)
    gives the INT8 GEMM-FLOP share.
    """
    tables = (ranges,) if isinstance(ranges, RangeTable) else tuple(ranges)
    flagged = flagged_layers(outliers)
    resolved = resolve(recipe, report, flagged)
    by_tensor: dict[str, list[_Request]] = {}
    weights = []
    for node in resolved.values():
        for request in _requests_for(node):
            by_tensor.setdefault(request.tensor, []).append(request)
        a = node.assignment
        if node.settings.precision == Precision.INT8 and a.role in WEIGHT_GEMM_ROLES:
            assert a.weight is not None and a.weight_axis is not None
            weights.append(WeightQuant(node=a.node, weight=a.weight, axis=a.weight_axis,
                                       bias_correction=bool(node.settings.bias_correction)))
    source = RangeSource(tables)
    merged = {tensor: _merge(tensor, requests) for tensor, requests in by_tensor.items()}
    source.check([(tensor, settings) for tensor, (_, settings) in merged.items()])
    by_node = {a.node: a for a in report.assignments}
    activations = []
    for tensor, (consumers, settings) in merged.items():
        activations.append(_activation(tensor, consumers, settings, source))
        _check_folding(activations[-1], by_node)
    activations = _share_attention_scales(activations, by_node)
    if flops is None:
        logger.warning("no GEMM FLOP counts given: the plan's INT8 GEMM-FLOP share will read 0")
    return QuantPlan(
        model_name=report.model_name, recipe_name=recipe.name, recipe_sha256=sha256_text(recipe_to_json(recipe)),
        ranges_sha256=sha256_text("".join(t.to_json() for t in tables)), model_dtype=recipe.model_dtype,
        activations=tuple(activations), weights=tuple(weights),
        nodes=tuple(_node_plans(resolved, recipe, flops or {})), flagged_layers=flagged or (), seq_len=seq_len)
