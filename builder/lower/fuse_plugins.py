"""Lowering stage: plugin-node fusion, the rewrite that turns a portable Q/DQ graph into the "plugin" variant.

Rules (each applied once per match, in order; the matched nodes are replaced by one plugin node at the
position of the first of them, so the node list stays topologically sorted):

    # Add(a, r) -> LayerNormalization -> QuantizeLinear(s, 0)  ->  LayerNormQuantize(a, g, b, r; scale=s)
    # LayerNormalization -> QuantizeLinear(s, 0)               ->  LayerNormQuantize(x, g, b; scale=s)
    # Add(x, mask) -> Softmax(-1) -> QuantizeLinear(s, 0)      ->  SoftmaxQuantize(x, mask; scale=s)
    # Softmax(-1) -> QuantizeLinear(s, 0)                      ->  SoftmaxQuantize(x; scale=s)
    # QuantizeLinear(s, 0) -> [SPARQ composition]              ->  SparqQuantize(x; scale=s)  (tried first;
    #                                                              builder.lower.fuse_sparq)

The plugin's INT8 output keeps the QuantizeLinear output's name, so the DequantizeLinear after it is untouched.
Every node the pass writes has a TensorRT registration: its ``plugin_namespace`` attribute names the registered
I/O form (``plugins/*/plugin.py`` ``FORMS``: residual input, mask input, normalized output), because a Quickly
Deployable Plugin fixes its input and output counts; the per-token form, which has none, is never written.
A LayerNormalization output with other consumers (the residual path) is kept as the plugin's ``normalized``
output under its own name. Attributes are validated here, at graph-building time: epsilon and scale > 0 and
finite, row width within the kernel's limit, float32/float16 inputs; a violation raises GraphError.

Shapes are proven with ONNX shape inference (with data propagation) on a probe copy whose symbolic input
dims are replaced by distinct primes (one per dim name): an Add is folded in only when its operands provably
have the plugin's required shapes (same shape for a residual; same rank and the Add's output shape for the
softmax input, which makes the other operand a valid broadcast mask).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from builder.lower.fuse_sparq import match_sparq
from calib.errors import ConfigError, GraphError, InternalError
from calib.schema import Schema, decode_json, to_json
from plugins.common import DOMAIN, PLUGIN_VERSION, check_float_dtype, check_row_width
from plugins.layernorm_quant.plugin import namespace_for as ln_namespace
from plugins.layernorm_quant.schema import OP_TYPE as LN_OP
from plugins.layernorm_quant.schema import LayerNormQuantizeAttrs
from plugins.softmax_quant.plugin import namespace_for as sm_namespace
from plugins.softmax_quant.schema import MAX_RANK, SoftmaxQuantizeAttrs
from plugins.softmax_quant.schema import OP_TYPE as SM_OP

LOG = logging.getLogger(__name__)

_PROBE_PRIMES = (3, 7, 11, 13, 17, 19, 23, 29, 31, 37)
FUSE_CONFIG_VERSION = 1
Shape = tuple[int | str, ...]


class FusePluginsConfig(Schema, frozen=True, kw_only=True):
    """Which patterns the pass fuses. Strict JSON: unknown keys are errors; ``version`` may be left out."""

    layernorm: bool = True
    softmax: bool = True
    residual: bool = True  # fold Add(a, r) -> LayerNormalization into the plugin's residual input
    mask: bool = True  # fold Add(x, mask) -> Softmax into the plugin's mask input
    sparq: bool = True  # Q -> SPARQ composition to SparqQuantize (its constants are dropped with it)
    version: int = FUSE_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != FUSE_CONFIG_VERSION:
            raise ConfigError(
                f"fuse-plugins config version {self.version!r} not supported; expected {FUSE_CONFIG_VERSION}"
            )

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); :meth:`from_json` reads it back equal."""
        return to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> FusePluginsConfig:
        """Decode a config; an unknown key, a non-boolean switch or another version raises ConfigError."""
        return decode_json(text, cls, "fuse-plugins config")


@dataclass(frozen=True, kw_only=True)
class FusedNode:
    """One plugin node the pass wrote and the nodes it replaced."""

    op_type: str
    name: str
    replaced: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class FusionResult:
    model: onnx.ModelProto
    fused: tuple[FusedNode, ...] = field(default_factory=tuple)

    def count(self, op_type: str) -> int:
        return sum(1 for f in self.fused if f.op_type == op_type)


@dataclass(frozen=True)
class _Rewrite:
    removed: tuple[onnx.NodeProto, ...]
    node: onnx.NodeProto


class _Index:
    """Producers, consumers, constants and probe-inferred types and shapes of one graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.opset = next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 0)
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.types, self.shapes = _probe_types_and_shapes(model)

    def only_consumer(self, tensor: str, node: onnx.NodeProto) -> bool:
        users = self.consumers.get(tensor, [])
        return len(users) == 1 and users[0] is node and tensor not in self.graph_outputs

    def shape(self, tensor: str) -> Shape | None:
        return self.shapes.get(tensor)


def _probe_types_and_shapes(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, Shape]]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    values: dict[str, int] = {}
    for inp in probe.graph.input:
        for dim in inp.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                key = dim.dim_param or f"{inp.name}:{len(values)}"
                values.setdefault(key, _PROBE_PRIMES[len(values) % len(_PROBE_PRIMES)])
                dim.dim_value = values[key]
    inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    types: dict[str, int] = {i.name: i.data_type for i in model.graph.initializer}
    shapes: dict[str, Shape] = {i.name: tuple(i.dims) for i in model.graph.initializer}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        tt = vi.type.tensor_type
        if tt.elem_type:
            types[vi.name] = tt.elem_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
            )
    return types, shapes


def _static(shape: Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _quantize_scale(ix: _Index, q: onnx.NodeProto) -> float | None:
    """The static per-tensor INT8 scale of a QuantizeLinear, or None if it is not that kind of Q."""
    if len(q.input) < 3 or q.input[1] not in ix.constants or q.input[2] not in ix.constants:
        return None
    scale, zero = ix.constants[q.input[1]], ix.constants[q.input[2]]
    if scale.size != 1 or zero.dtype != np.int8:
        return None
    if np.any(zero != 0):
        raise GraphError(f"QuantizeLinear {q.name!r}: zero point must be 0 (symmetric INT8), got {zero.ravel()[0]}")
    value = float(scale.ravel()[0])
    if not np.isfinite(value) or value <= 0:
        raise GraphError(f"QuantizeLinear {q.name!r}: scale {value!r} is not allowed; it must be finite and > 0")
    return value


def _last_axis(node: onnx.NodeProto, rank: int | None, default: int) -> bool:
    axis = int(_attr(node, "axis", default))
    return axis == -1 or (rank is not None and axis == rank - 1)


def _plugin_node(op_type: str, name: str, inputs: Sequence[str], outputs: Sequence[str],
                 attrs: Mapping[str, float | int | str]) -> onnx.NodeProto:
    node = helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=DOMAIN)
    node.attribute.extend(helper.make_attribute(key, value) for key, value in sorted(attrs.items()))
    return node


def _residual_operands(ix: _Index, ln: onnx.NodeProto) -> tuple[onnx.NodeProto, str, str] | None:
    add = ix.producer.get(ln.input[0])
    if add is None or add.op_type != "Add" or not ix.only_consumer(add.output[0], ln):
        return None
    a, r = add.input[0], add.input[1]
    if a in ix.constants or r in ix.constants:
        return None  # a bias add, not a residual
    sa, sr, so = ix.shape(a), ix.shape(r), ix.shape(add.output[0])
    if not (_static(sa) and sa == sr == so) or ix.types.get(a) != ix.types.get(r):
        return None
    return add, a, r


def _match_layernorm(ix: _Index, q: onnx.NodeProto, config: FusePluginsConfig) -> _Rewrite | None:
    ln = ix.producer.get(q.input[0])
    if ln is None or ln.op_type != "LayerNormalization" or any(o for o in ln.output[1:]):
        return None
    x = ln.input[0]
    shape = ix.shape(x)
    if not _last_axis(ln, len(shape) if shape else None, -1):
        return None
    scale = _quantize_scale(ix, q)
    if scale is None:
        return None
    dtype = ix.types.get(x, 0)
    check_float_dtype(f"LayerNormalization {ln.name!r} input {x!r}", dtype)
    width = ix.shape(ln.input[1])
    if not width or not isinstance(width[-1], int):
        raise GraphError(f"LayerNormalization {ln.name!r}: the width of gamma {ln.input[1]!r} is unknown")
    check_row_width(f"LayerNormalization {ln.name!r} width", width[-1])
    for extra in ln.input[1:3]:
        if extra and ix.types.get(extra, dtype) != dtype:
            raise GraphError(f"LayerNormalization {ln.name!r}: {extra!r} must have the dtype of {x!r}")
    if len(ln.input) < 3 or not ln.input[2]:
        raise GraphError(f"LayerNormalization {ln.name!r} has no bias input; the plugin needs beta")
    residual = _residual_operands(ix, ln) if config.residual else None
    removed: tuple[onnx.NodeProto, ...]
    users = [n for n in ix.consumers.get(ln.output[0], []) if n is not q]
    emit = bool(users) or ln.output[0] in ix.graph_outputs
    attrs = LayerNormQuantizeAttrs(epsilon=float(_attr(ln, "epsilon", 1e-5)), scale=scale,
                                   has_residual=residual is not None, emit_normalized=emit)
    outputs = [q.output[0]] + ([ln.output[0]] if emit else [])
    if residual is not None:
        add, a, r = residual
        inputs, removed = [a, ln.input[1], ln.input[2], r], (add, ln, q)
    else:
        inputs, removed = [x, ln.input[1], ln.input[2]], (ln, q)
    node_attrs = {**attrs.to_onnx_attributes(), "plugin_namespace": ln_namespace(attrs)}
    node = _plugin_node(LN_OP, f"{ln.name}/{LN_OP}", inputs, outputs, node_attrs)
    return _Rewrite(removed=removed, node=node)


def _mask_operands(ix: _Index, sm: onnx.NodeProto) -> tuple[onnx.NodeProto, str, str] | None:
    add = ix.producer.get(sm.input[0])
    if add is None or add.op_type != "Add" or not ix.only_consumer(add.output[0], sm):
        return None
    out = ix.shape(add.output[0])
    if not _static(out):
        return None
    # Add broadcasts both operands to its output: an operand with exactly the output's shape is the input,
    # and the other one then broadcasts to it by numpy's rules, as the plugin's mask must.
    for x, mask in ((add.input[0], add.input[1]), (add.input[1], add.input[0])):
        if ix.shape(x) == out and ix.types.get(x) == ix.types.get(mask):
            return add, x, mask
    return None


def _match_softmax(ix: _Index, q: onnx.NodeProto, config: FusePluginsConfig) -> _Rewrite | None:
    sm = ix.producer.get(q.input[0])
    if sm is None or sm.op_type != "Softmax" or ix.opset < 13 or not ix.only_consumer(sm.output[0], q):
        return None
    x = sm.input[0]
    shape = ix.shape(x)
    if not _last_axis(sm, len(shape) if shape else None, -1):
        return None
    scale = _quantize_scale(ix, q)
    if scale is None:
        return None
    check_float_dtype(f"Softmax {sm.name!r} input {x!r}", ix.types.get(x, 0))
    if shape is None or not 1 <= len(shape) <= MAX_RANK:
        raise GraphError(f"Softmax {sm.name!r}: input rank {None if shape is None else len(shape)} is not "
                         f"supported by {SM_OP}; allowed 1..{MAX_RANK}")
    if isinstance(shape[-1], int):
        check_row_width(f"Softmax {sm.name!r} row width", shape[-1])
    masked = _mask_operands(ix, sm) if config.mask else None
    removed: tuple[onnx.NodeProto, ...]
    attrs = SoftmaxQuantizeAttrs(scale=scale, has_mask=masked is not None)
    if masked is not None:
        add, xin, mask = masked
        inputs, removed = [xin, mask], (add, sm, q)
    else:
        inputs, removed = [x], (sm, q)
    node_attrs = {**attrs.to_onnx_attributes(), "plugin_namespace": sm_namespace(attrs)}
    node = _plugin_node(SM_OP, f"{sm.name}/{SM_OP}", inputs, [q.output[0]], node_attrs)
    return _Rewrite(removed=removed, node=node)


def _match_sparq(ix: _Index, q: onnx.NodeProto, config: FusePluginsConfig) -> _Rewrite | None:
    found = match_sparq(ix, q, lambda node: _quantize_scale(ix, node))
    return None if found is None else _Rewrite(removed=found[0], node=found[1])


_Rule = Callable[[_Index, onnx.NodeProto, FusePluginsConfig], "_Rewrite | None"]


def _rules(config: FusePluginsConfig) -> tuple[_Rule, ...]:
    rules: list[_Rule] = [_match_sparq] if config.sparq else []  # first: a Q feeding a composition belongs to it
    if config.layernorm:
        rules.append(_match_layernorm)
    if config.softmax:
        rules.append(_match_softmax)
    return tuple(rules)


def _output_types(ix: _Index, rewrites: list[_Rewrite]) -> list[onnx.ValueInfoProto]:
    """Element types of the plugin outputs, so shape inference runs through the plugin variant."""
    infos: list[onnx.ValueInfoProto] = []
    for rw in rewrites:
        x_type = ix.types.get(rw.node.input[0], onnx.TensorProto.FLOAT)
        types = [onnx.TensorProto.INT8] + [x_type] * (len(rw.node.output) - 1)
        infos.extend(helper.make_tensor_value_info(name, elem, None)
                     for name, elem in zip(rw.node.output, types, strict=True))
    return infos


def _apply(
    model: onnx.ModelProto, rewrites: list[_Rewrite], output_types: list[onnx.ValueInfoProto]
) -> onnx.ModelProto:
    removed_ids = {id(n) for rw in rewrites for n in rw.removed}
    first: dict[int, onnx.NodeProto] = {}
    graph = model.graph
    order = {id(n): i for i, n in enumerate(graph.node)}
    for rw in rewrites:
        first[min(order[id(n)] for n in rw.removed)] = rw.node
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        if i in first:
            nodes.append(first[i])
        if id(node) not in removed_ids:
            nodes.append(node)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    live = {o for n in nodes for o in n.output} | {i.name for i in out.graph.input}
    kept = [vi for vi in out.graph.value_info if vi.name in live]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    out.graph.value_info.extend(output_types)
    read = {t for n in nodes for t in n.input}
    orphaned = {t for rw in rewrites for n in rw.removed for t in n.input} - read  # e.g. a SPARQ span's constants
    kept_inits = [i for i in out.graph.initializer if i.name not in orphaned]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept_inits)
    if not any(op.domain == DOMAIN for op in out.opset_import):
        out.opset_import.append(helper.make_opsetid(DOMAIN, int(PLUGIN_VERSION)))
    return out


def fuse_plugins(model: onnx.ModelProto, config: FusePluginsConfig | None = None) -> FusionResult:
    """Return the plugin variant of a portable Q/DQ ``model`` (the input is not modified)."""
    config = config or FusePluginsConfig()
    ix = _Index(model)
    rewrites: list[_Rewrite] = []
    claimed: set[int] = set()
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        for rule in _rules(config):
            rw = rule(ix, node, config)
            if rw is None:
                continue
            if any(id(n) in claimed for n in rw.removed):
                raise InternalError(f"fusion rewrites overlap at {node.name!r}")
            claimed.update(id(n) for n in rw.removed)
            rewrites.append(rw)
            break
    if not rewrites:
        LOG.info("fuse_plugins: no LayerNorm->Q or Softmax->Q pattern found")
        return FusionResult(model=model)
    fused_model = _apply(model, rewrites, _output_types(ix, rewrites))
    fused = tuple(FusedNode(op_type=rw.node.op_type, name=rw.node.name, replaced=tuple(n.name for n in rw.removed))
                  for rw in rewrites)
    LOG.info("fuse_plugins: %d %s, %d %s nodes", sum(f.op_type == LN_OP for f in fused), LN_OP,
             sum(f.op_type == SM_OP for f in fused), SM_OP)
    return FusionResult(model=fused_model, fused=fused)
