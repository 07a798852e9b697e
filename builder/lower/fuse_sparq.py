"""Lowering stage: the plugin-variant rule for SPARQ edges (one rule of builder.lower.fuse_plugins).

    # QuantizeLinear(s, 0) -> [SPARQ composition] -> DequantizeLinear(s)  ->  SparqQuantize(x; scale=s) -> DQ(s)

The composition (builder/lower/sparq_ops.py) is found by the metadata its nodes carry (prefix, role, and the
config on its output node), so the rule never guesses from op patterns: the composition's input node must read
the QuantizeLinear's output and be its only reader. The plugin writes the composition's INT8 output under its
name, so the DequantizeLinear nodes after it are untouched; the node's attributes are the composition's own
config and the Q's float32 scale (plugins/sparq_quant/README.md). The plugin computes the codes with the same
IEEE float32 division as QuantizeLinear and pairs along the same last axis, so both variants give the same
codes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import onnx
from onnx import helper

from builder.lower.sparq_ops import METADATA_CONFIG, METADATA_KEY, METADATA_ROLE
from calib.errors import ConfigError, GraphError
from calib.schema import decode_json
from calib.sparq import SparqConfig
from plugins.common import DOMAIN
from plugins.sparq_quant.schema import OP_TYPE, SparqQuantizeAttrs

LOG = logging.getLogger(__name__)


class GraphIndex(Protocol):
    """What the rule reads of the fusion pass's graph index (builder.lower.fuse_plugins)."""

    consumers: dict[str, list[onnx.NodeProto]]

    def only_consumer(self, tensor: str, node: onnx.NodeProto) -> bool: ...


def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _members(ix: GraphIndex, entry: onnx.NodeProto, prefix: str) -> list[onnx.NodeProto]:
    """The composition's nodes: everything of its prefix downstream of its input node (all of them are)."""
    found, stack, seen = [], [entry], {id(entry)}
    while stack:
        node = stack.pop()
        found.append(node)
        for out in node.output:
            for reader in ix.consumers.get(out, []):
                if id(reader) not in seen and _meta(reader).get(METADATA_KEY) == prefix:
                    seen.add(id(reader))
                    stack.append(reader)
    return found


def match_sparq(ix: GraphIndex, q: onnx.NodeProto, scale_of: Callable[[onnx.NodeProto], float | None]
                ) -> tuple[tuple[onnx.NodeProto, ...], onnx.NodeProto] | None:
    """(nodes replaced, the SparqQuantize node) for Q -> composition -> DQ; None when ``q`` feeds no composition.

    ``scale_of`` reads a QuantizeLinear's static per-tensor scale (None when it has none).
    """
    readers = ix.consumers.get(q.output[0], [])
    entry = next((r for r in readers if _meta(r).get(METADATA_ROLE) == "input"), None)
    if entry is None:
        return None
    prefix = _meta(entry)[METADATA_KEY]
    if not ix.only_consumer(q.output[0], entry):  # the untrimmed codes are read elsewhere too: keep both
        LOG.info("SPARQ composition %s: its QuantizeLinear has other readers; left portable", prefix)
        return None
    members = _members(ix, entry, prefix)
    last = next((n for n in members if _meta(n).get(METADATA_ROLE) == "output"), None)
    if last is None:
        raise GraphError(f"SPARQ composition {prefix!r} has no output node downstream of its input")
    try:
        options = decode_json(_meta(last).get(METADATA_CONFIG, ""), SparqConfig, f"SPARQ composition {prefix!r}")
    except ConfigError as exc:
        raise GraphError(str(exc)) from exc
    span_output = last.output[0]
    scale = scale_of(q)
    if scale is None:
        raise GraphError(f"QuantizeLinear {q.name!r} before SPARQ composition {prefix!r} has no static "
                         "per-tensor INT8 scale")
    attrs = SparqQuantizeAttrs.from_config(options, scale=scale)
    node = helper.make_node(OP_TYPE, [q.input[0]], [span_output], name=f"{prefix}/{OP_TYPE}",
                            domain=DOMAIN)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in sorted(attrs.to_onnx_attributes().items()))
    return (q, *members), node
