"""Lowering stage: the context a quantizer's lowering rule works in.

It wraps the graph editor with the plan and the WeightSet: rules insert Q/DQ pairs, ask for the weight a
GEMM should multiply (written once from the WeightSet by the weight quantizer's own lowering rule, or the
transformed float weight of a GEMM left in high precision) and schedule work that must follow the weights
(folding a centered offset into a bias uses the dequantized weights).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from builder.lower.graph_edit import GraphEditor
from builder.lower.qdq import insert_qdq
from builder.plan.artifact import ActivationEdge, QuantPlan, WeightEdge
from builder.quant.registry import activation_quantizer, weight_quantizer
from builder.weights.weightset import WeightSet, view_key
from calib.errors import BuildError
from calib.schema import to_json

F32 = npt.NDArray[np.float32]


@dataclass
class LoweringContext:
    """Mutable state of one lowering: the graph, what to write, and what has been written."""

    ed: GraphEditor
    plan: QuantPlan
    weights: WeightSet
    rewritten: set[str] = field(default_factory=set)  # GEMM nodes whose weight a rule already wrote (or removed)
    _written: dict[tuple[object, ...], str] = field(default_factory=dict)  # what was written -> its tensor
    _after_weights: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._by_node = {w.node: w for w in self.plan.weights}
        self._by_tensor = {a.tensor: a for a in self.plan.activations}

    def insert_qdq(self, tensor: str, amax: float, consumers: tuple[str, ...], tag: str = "",
                   offset: float = 0.0) -> str:
        """Q -> DQ on ``tensor`` for ``consumers`` (``("*",)``: every reader); returns the DQ output."""
        return insert_qdq(self.ed, tensor, amax, consumers, tag, offset)

    def weight_edge(self, node: str) -> WeightEdge | None:
        """The planned INT8 weight of GEMM ``node`` (None: its weight stays float)."""
        return self._by_node.get(node)

    def float_view(self, node: str, weight: str, axis: int, view: str, edge: ActivationEdge | None = None) -> F32:
        """The float weight ``view`` of GEMM ``node``: the views of its input edge's quantizer (``edge``, else
        the planned input edge of the node; without one, the weight itself)."""
        value = self.ed.initializer(weight)
        if value is None:
            raise BuildError(f"GEMM {node!r}: weight {weight!r} is not a constant initializer")
        planned = self._by_node.get(node)
        edge = edge or (None if planned is None else self._by_tensor.get(planned.input))
        if edge is None:
            if view:
                raise BuildError(f"GEMM {node!r}: weight view {view!r} without an input edge")
            return value
        views = activation_quantizer(edge.quantizer).weight_views(edge.params, value, axis)
        if view not in views:
            raise BuildError(f"GEMM {node!r}: no weight view {view!r} (views: {', '.join(views)})")
        return views[view]

    def weight_tensor(self, node: str, weight: str, axis: int, view: str = "",
                      edge: ActivationEdge | None = None) -> str:
        """The tensor GEMM ``node`` should read as its weight ``view``: integers + DequantizeLinear when the
        plan quantizes it, else the float view as an initializer. An unchanged weight shared by several GEMMs
        with the same weight quantization is written once."""
        planned = self._by_node.get(node)
        config = None if planned is None else (planned.quantizer, to_json(planned.config))
        key = (weight, "", config) if not view else (node, view, config)
        if key in self._written:
            return self._written[key]
        base = weight if not view else f"{weight}_{view}"
        if planned is None:
            out = self.ed.add_initializer(base, self.float_view(node, weight, axis, view, edge))
        else:
            quantized = self.weights.get(view_key(node, view))
            out = weight_quantizer(planned.quantizer).lower(self, quantized, base)
        self._written[key] = out
        return out

    def dequantized(self, node: str, view: str = "") -> F32:
        """The float weight an INT8 GEMM multiplies (the dequantized WeightSet entry), stored layout."""
        planned = self._by_node.get(node)
        if planned is None:
            raise BuildError(f"GEMM {node!r} has no INT8 weight in the plan")
        return weight_quantizer(planned.quantizer).reference(self.weights.get(view_key(node, view)))

    def after_weights(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once every weight is written (e.g. fold an offset into a bias)."""
        self._after_weights.append(fn)

    def run_after_weights(self) -> None:
        pending, self._after_weights = self._after_weights, []
        for fn in pending:
            fn()
