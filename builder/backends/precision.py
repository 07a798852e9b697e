"""Engine-build stage: which layers of a weakly typed TensorRT 10 network a precision rule pins, and how.

TensorRT's ONNX parser names layers after their node but also creates helper layers (constants, shuffles,
shape arithmetic) and numbers repeats (``name_1``); matching layer *names* against ``node*`` therefore pins
helpers and sibling nodes too. Every layer the parser creates carries the node it came from in its metadata,
``[ONNX Layer: <node name>]`` or ``[ONNX Layer: <node name> | Local Function: <f>]`` (onnx-tensorrt's
``processMetadata``); rules match that node name. A layer's precision is pinned only when it computes in
floating point, and an output type is set only on float outputs (shape tensors stay INT32/INT64).

Pure functions over :class:`LayerView` records, so the selection is tested without TensorRT.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from builder.backends.options import LayerDtype, LayerPrecision
from calib.errors import ConfigError

_METADATA = re.compile(r"^\[ONNX Layer: (?P<node>.*?)(?: \| Local Function: [^\]]*)?\]$", re.DOTALL)
FLOAT_TYPES = frozenset({"FLOAT", "HALF", "BF16"})


def onnx_node_of(metadata: str) -> str | None:
    """The ONNX node name in a layer's metadata, or None when the layer has none (not from the parser)."""
    match = _METADATA.match(metadata or "")
    return match.group("node") if match else None


@dataclass(frozen=True, kw_only=True)
class LayerView:
    """What the selection needs of one network layer: its index, source node and output dtype names."""

    index: int
    node: str | None
    output_types: tuple[str, ...]

    @property
    def float_outputs(self) -> tuple[int, ...]:
        return tuple(j for j, t in enumerate(self.output_types) if t in FLOAT_TYPES)


@dataclass(frozen=True, kw_only=True)
class Constraint:
    """Pin layer ``index`` to ``dtype`` and set that output type on ``outputs`` (its float outputs)."""

    index: int
    dtype: LayerDtype
    outputs: tuple[int, ...]


def constrained_layers(layers: Sequence[LayerView], rules: Sequence[LayerPrecision]) -> list[Constraint]:
    """The constraints ``rules`` put on ``layers`` (a later rule wins for a layer two rules match).

    A rule that matches no ONNX node of the network is a ConfigError naming it (a typo never passes silently).
    """
    chosen: dict[int, Constraint] = {}
    for rule in rules:
        matched = [v for v in layers if v.node is not None and fnmatch.fnmatchcase(v.node, rule.pattern)]
        if not matched:
            nodes = sorted({layer.node for layer in layers if layer.node is not None})
            raise ConfigError(
                f"layer precision pattern {rule.pattern!r} matches no ONNX node of the network "
                f"({len(nodes)} nodes, e.g. {nodes[:3]})"
            )
        for layer in matched:
            if layer.float_outputs:
                chosen[layer.index] = Constraint(index=layer.index, dtype=rule.dtype, outputs=layer.float_outputs)
    return [chosen[i] for i in sorted(chosen)]


def layer_views(network: Any) -> list[LayerView]:
    """:class:`LayerView` of every layer of a TensorRT network."""
    views = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        types = tuple(str(getattr(layer.get_output(j).dtype, "name", "")) for j in range(layer.num_outputs))
        views.append(LayerView(index=i, node=onnx_node_of(str(getattr(layer, "metadata", "") or "")),
                               output_types=types))
    return views
