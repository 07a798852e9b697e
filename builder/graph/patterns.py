"""Analysis stage: local patterns of a transformer graph, each found structurally (never by node name).

- weight GEMMs: ``MatMul(x, W)`` / ``Gemm(x, W)`` with ``W`` an initializer (optionally behind a Transpose),
  plus an optional bias ``Add`` right after;
- LayerNorms: the ``LayerNormalization`` op, or the decomposed ``ReduceMean -> Sub -> Pow|Mul -> ReduceMean
  -> Add(eps) -> Sqrt -> Div|Reciprocal+Mul [-> Mul(gamma)] [-> Add(beta)]``;
- attention cores: ``MatMul(Q, K^T) [-> Div|Mul scale] [-> Add mask | Where] -> Softmax -> MatMul(P, V)``;
- residual Adds: ``Add(skip, f(skip))`` where the branch ``f`` contains a weight GEMM.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from builder.graph.topology import GraphIndex

# element-wise or layout ops allowed between QK^T and Softmax (scale, mask, casts)
_SCORE_OPS = frozenset({"Div", "Mul", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose", "Clip", "Max", "Min",
                        "Identity"})
# ops allowed between Softmax and the PV MatMul
_PROB_OPS = frozenset({"Cast", "Dropout", "Identity", "Where", "Reshape"})
# layout-only ops skipped when looking for the activation in front of fc2
LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast"})


@dataclass(frozen=True)
class WeightGemm:
    """A GEMM with a constant weight."""

    node: int
    x: str  # activation input
    weight: str  # initializer name
    weight_axis: int  # axis of the initializer that keeps one scale per output channel
    in_features: int
    bias_add: int | None  # Add node adding a constant bias right after the GEMM
    out: str  # output of the unit (after the bias Add when there is one)


@dataclass(frozen=True)
class LayerNormMatch:
    anchor: int  # node producing the normalized output
    x: str
    out: str
    members: tuple[int, ...]  # every node of the pattern, in graph order
    fused: bool


@dataclass(frozen=True)
class AttentionCore:
    qk: int
    softmax: int
    pv: int
    q: str  # QK MatMul input 0
    k: str  # QK MatMul input 1 (K^T)
    v: str  # PV MatMul input that is not the probabilities


@dataclass(frozen=True)
class Residual:
    add: int
    skip: str
    branch: str
    branch_nodes: frozenset[int]  # nodes on data paths from skip to branch (the Add excluded)


def find_weight_gemms(g: GraphIndex) -> tuple[WeightGemm, ...]:
    found: list[WeightGemm] = []
    for i, node in enumerate(g.nodes):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or g.is_const(node.input[0]):
            continue
        weight_info = _weight_of(g, i)
        if weight_info is None:
            continue
        weight, axis, in_features = weight_info
        bias_add = _bias_add(g, node.output[0])
        out = g.nodes[bias_add].output[0] if bias_add is not None else node.output[0]
        found.append(WeightGemm(i, node.input[0], weight, axis, in_features, bias_add, out))
    return tuple(found)


def _weight_of(g: GraphIndex, i: int) -> tuple[str, int, int] | None:
    """(initializer, output-channel axis, K) of GEMM ``i``, or None if its B input is not a constant weight."""
    node = g.nodes[i]
    b = node.input[1]
    transposed = False
    shape = g.const_shape(b)
    if shape is None:  # Transpose(W) of a 2-D initializer swaps the axes
        j = g.producer_of(b)
        if j is None or g.nodes[j].op_type != "Transpose" or g.const_shape(g.nodes[j].input[0]) is None:
            return None
        perm = [list(a.ints) for a in g.nodes[j].attribute if a.name == "perm"]
        src_shape = g.const_shape(g.nodes[j].input[0])
        if src_shape is None or len(src_shape) != 2 or perm not in ([], [[1, 0]]):
            return None
        b, shape, transposed = g.nodes[j].input[0], src_shape, True
    if len(shape) < 2:
        return None
    if node.op_type == "Gemm":
        trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        trans_b ^= transposed
        return (b, 0 if trans_b else 1, shape[1] if trans_b else shape[0])
    last = len(shape) - 1
    if transposed:  # MatMul(x, Transpose(W[N, K])): channels on axis 0 of W
        return (b, 0, shape[1])
    return (b, last, shape[last - 1])


def _bias_add(g: GraphIndex, out: str) -> int | None:
    j = g.sole_consumer(out)
    if j is None or g.nodes[j].op_type != "Add":
        return None
    other = [t for t in g.nodes[j].input if t != out]
    return j if len(other) == 1 and g.is_const(other[0]) else None


def find_layer_norms(g: GraphIndex) -> tuple[LayerNormMatch, ...]:
    found: list[LayerNormMatch] = []
    for i, node in enumerate(g.nodes):
        if node.op_type == "LayerNormalization":
            found.append(LayerNormMatch(i, node.input[0], node.output[0], (i,), True))
        elif node.op_type == "ReduceMean":
            match = _decomposed_layer_norm(g, i)
            if match is not None:
                found.append(match)
    return tuple(found)


def _decomposed_layer_norm(g: GraphIndex, mean: int) -> LayerNormMatch | None:
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
        out = node.output[0]
        for op in ("Mul", "Add"):  # optional gamma, then beta
            k = g.sole_consumer(out)
            if k is None or g.nodes[k].op_type != op:
                continue
            rest = [t for t in g.nodes[k].input if t != out]
            if len(rest) == 1 and g.is_const(rest[0]):
                members.add(k)
                out = g.nodes[k].output[0]
        anchor = g.producer[out]
        return LayerNormMatch(anchor, x, out, tuple(sorted(members)), False)
    return None


def find_attention_cores(g: GraphIndex, weight_gemms: frozenset[int]) -> tuple[AttentionCore, ...]:
    found: list[AttentionCore] = []
    for i, node in enumerate(g.nodes):
        if node.op_type != "Softmax":
            continue
        qk = _search(g, node.input[0], _SCORE_OPS, weight_gemms, backward=True)
        pv = _search(g, node.output[0], _PROB_OPS, weight_gemms, backward=False)
        if qk is None or pv is None:
            continue
        probs_side = g.ancestors([g.nodes[pv].input[0]]) if g.nodes[pv].input[0] not in g.constants else frozenset()
        v = g.nodes[pv].input[1] if i in probs_side else g.nodes[pv].input[0]
        found.append(AttentionCore(qk, i, pv, g.nodes[qk].input[0], g.nodes[qk].input[1], v))
    return tuple(found)


def _search(g: GraphIndex, start: str, through: frozenset[str], skip: frozenset[int], backward: bool) -> int | None:
    """Nearest activation-activation MatMul from ``start``, passing only ``through`` ops (at most 8 hops)."""
    queue: deque[tuple[str, int]] = deque([(start, 0)])
    seen: set[str] = set()
    while queue:
        tensor, depth = queue.popleft()
        if tensor in seen or depth > 8:
            continue
        seen.add(tensor)
        nodes = [g.producer[tensor]] if backward and tensor in g.producer else []
        if not backward:
            nodes = list(g.consumers_of(tensor))
        for j in nodes:
            node = g.nodes[j]
            if node.op_type == "MatMul" and j not in skip and not any(g.is_const(t) for t in node.input):
                return j
            if node.op_type in through:
                nxt = g.data_inputs(j) if backward else tuple(node.output)
                queue.extend((t, depth + 1) for t in nxt)
    return None


def find_residuals(g: GraphIndex, weight_gemms: frozenset[int]) -> tuple[Residual, ...]:
    """Adds ``skip + branch`` where ``skip`` reaches ``branch`` through a weight GEMM but through no earlier residual.

    The second condition rejects side inputs that merely precede the block: an attention mask reaches the next
    layer's scores through the previous layer's residual Adds, while a true skip connection wraps one branch.
    """
    found: list[Residual] = []
    confirmed: set[int] = set()
    for i, node in enumerate(g.nodes):
        if node.op_type != "Add" or len(g.data_inputs(i)) != 2 or node.input[0] == node.input[1]:
            continue
        for skip, branch in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            path = g.between(skip, branch)
            if path & weight_gemms and not path & confirmed:
                found.append(Residual(i, skip, branch, path))
                confirmed.add(i)
                break
    return tuple(found)
