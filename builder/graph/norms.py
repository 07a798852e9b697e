"""Analysis stage: normalization patterns (LayerNorm and RMSNorm, fused or decomposed), found structurally.

- LayerNorm: ``LayerNormalization``, or ``ReduceMean -> Sub -> Pow|Mul -> ReduceMean -> Add(eps) -> Sqrt
  -> Div|Reciprocal+Mul [-> Mul(gamma)] [-> Add(beta)]`` (Ba, Kiros, Hinton 2016, arXiv 1607.06450);
- RMSNorm (Zhang, Sennrich 2019, arXiv 1910.07467): ``RMSNormalization`` (ONNX opset 23) or ONNX Runtime's
  ``SimplifiedLayerNormalization``, or decomposed as exporters write ``x * rsqrt(mean(x^2) + eps) * w``::

      x -> Pow(2) | Mul(x, x) -> ReduceMean -> [Add(eps)] -> Sqrt -> Div(1, .) | Reciprocal --> Mul(x, .)
                                                                  '-------------> Div(x, .) --'
        [-> Cast] [-> Mul(gamma)] [-> Cast]

  ``x`` is often a ``Cast`` to float32 of the residual stream (the Cast stays outside the pattern: the
  residual Add may read its output too); ``source`` is the tensor behind such Casts.
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.graph.topology import GraphIndex

FUSED_LAYER_NORMS = frozenset({"LayerNormalization"})
FUSED_RMS_NORMS = frozenset({"RMSNormalization", "SimplifiedLayerNormalization"})
_RSQRT_CHAIN = frozenset({"Add", "Sqrt", "Reciprocal", "Div", "Pow", "Cast"})


@dataclass(frozen=True)
class NormMatch:
    anchor: int  # node producing the normalized output
    x: str  # normalized input
    source: str  # x behind Cast/Identity nodes (the residual-stream tensor)
    out: str
    members: tuple[int, ...]  # every node of the pattern, in graph order
    fused: bool
    rms: bool

    @property
    def op_type(self) -> str:
        kind = "RMSNorm" if self.rms else "LayerNorm"
        if self.fused:
            return "RMSNormalization" if self.rms else "LayerNormalization"
        return f"{kind}(decomposed)"


def stream_source(g: GraphIndex, tensor: str) -> str:
    """``tensor`` behind Cast and Identity nodes."""
    for _ in range(4):
        j = g.producer_of(tensor)
        if j is None or g.nodes[j].op_type not in ("Cast", "Identity"):
            break
        tensor = g.nodes[j].input[0]
    return tensor


def find_norms(g: GraphIndex) -> tuple[NormMatch, ...]:
    """Every LayerNorm and RMSNorm of the graph, in graph order of their anchors."""
    found: list[NormMatch] = []
    means = [i for i, node in enumerate(g.nodes) if node.op_type == "ReduceMean"]
    for i, node in enumerate(g.nodes):
        fused_rms = node.op_type in FUSED_RMS_NORMS
        if node.op_type in FUSED_LAYER_NORMS or fused_rms:
            x = node.input[0]
            found.append(NormMatch(i, x, stream_source(g, x), node.output[0], (i,), True, fused_rms))
    found.extend(m for i in means if (m := _decomposed_layer_norm(g, i)) is not None)
    taken = {j for m in found for j in m.members}  # a LayerNorm's variance is an RMS of x - mean: not an RMSNorm
    found.extend(m for i in means if i not in taken and (m := _decomposed_rms_norm(g, i)) is not None)
    return tuple(sorted(found, key=lambda m: m.anchor))


def _affine_tail(g: GraphIndex, out: str, members: set[int], ops: tuple[str, ...]) -> str:
    """Follow optional single-consumer ``ops`` (in order) whose other input is a constant; add them to members."""
    for op in ops:
        k = g.sole_consumer(out)
        if k is None or g.nodes[k].op_type != op:
            continue
        rest = [t for t in g.nodes[k].input if t != out]
        if op == "Cast" or (len(rest) == 1 and g.is_const(rest[0])):
            members.add(k)
            out = g.nodes[k].output[0]
    return out


def _decomposed_layer_norm(g: GraphIndex, mean: int) -> NormMatch | None:
    x = g.nodes[mean].input[0]
    mean_out = g.nodes[mean].output[0]
    sub = next((j for j in g.consumers_of(mean_out)
                if g.nodes[j].op_type == "Sub" and list(g.nodes[j].input) == [x, mean_out]), None)
    if sub is None:
        return None
    d = g.nodes[sub].output[0]
    for j in g.consumers_of(d):
        node = g.nodes[j]
        other = [t for t in node.input if t != d]
        if node.op_type not in ("Div", "Mul") or len(other) != 1 or g.is_const(other[0]):
            continue
        if node.op_type == "Div" and node.input[0] != d:
            continue
        std_path = g.between(d, other[0])
        if not any(g.nodes[k].op_type == "ReduceMean" for k in std_path):
            continue
        members = {mean, sub, j, *std_path}
        out = _affine_tail(g, node.output[0], members, ("Mul", "Add"))  # optional gamma, then beta
        return NormMatch(g.producer[out], x, stream_source(g, x), out, tuple(sorted(members)), False, False)
    return None


def _square_input(g: GraphIndex, i: int) -> str | None:
    """``x`` when node ``i`` computes ``x^2`` (``Pow(x, 2)`` or ``Mul(x, x)``), else None."""
    node = g.nodes[i]
    x = str(node.input[0])
    if node.op_type == "Mul" and len(node.input) == 2 and x == node.input[1]:
        return x
    if node.op_type == "Pow" and g.const_float(node.input[1]) == 2.0:
        return x
    return None


def _decomposed_rms_norm(g: GraphIndex, mean: int) -> NormMatch | None:
    square = g.producer_of(g.nodes[mean].input[0])
    x = None if square is None else _square_input(g, square)
    if square is None or x is None or g.sole_consumer(g.nodes[square].output[0]) != mean:
        return None
    members = {square, mean}
    t = g.nodes[mean].output[0]
    for _ in range(6):  # mean(x^2) -> [+eps] -> sqrt -> 1/. , or straight into Div(x, .)
        k = g.sole_consumer(t)
        if k is None:
            return None
        node = g.nodes[k]
        if node.op_type in ("Mul", "Div") and x in node.input and t in node.input:
            if node.op_type == "Div" and node.input[0] != x:
                return None
            members.add(k)
            if not any(g.nodes[m].op_type in ("Sqrt", "Reciprocal", "Pow", "Div") for m in members - {square, k}) \
                    and node.op_type == "Mul":
                return None  # x * mean(x^2) is not a normalization
            out = _affine_tail(g, node.output[0], members, ("Cast", "Mul", "Cast"))
            return NormMatch(g.producer[out], x, stream_source(g, x), out, tuple(sorted(members)), False, True)
        if node.op_type not in _RSQRT_CHAIN or len(g.data_inputs(k)) != 1:
            return None
        members.add(k)
        t = node.output[0]
    return None
