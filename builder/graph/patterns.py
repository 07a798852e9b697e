"""Analysis stage: local patterns of a transformer graph, each found structurally (never by node name).

Weight GEMMs live in :mod:`builder.graph.weights`, normalizations in :mod:`builder.graph.norms`; here:

- attention cores: ``MatMul(Q, K^T) [-> Div|Mul scale] [-> Add mask | Where] -> Softmax -> MatMul(P, V)``
  (with grouped-query attention K and V reach the MatMuls through Unsqueeze/Expand/Reshape: the repeat);
- rotary position embeddings (Su et al. 2021, arXiv 2104.09864, eq. 34, as Hugging Face writes it)::

      x * cos + rotate_half(x) * sin        rotate_half(x) = Concat(-x[..., d/2:], x[..., :d/2])

  or the fused ``RotaryEmbedding`` op (ONNX opset 23, ONNX Runtime contrib);
- residual Adds: ``Add(skip, f(skip))`` where the branch ``f`` contains a weight GEMM;
- fused ops that hide the roles analysis needs (refused up front: see :data:`OPAQUE_OPS`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from builder.graph.report import Operand
from builder.graph.topology import GraphIndex

# element-wise or layout ops allowed between QK^T and Softmax (scale, mask, casts)
_SCORE_OPS = frozenset({"Div", "Mul", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose", "Clip", "Max", "Min",
                        "Identity", "Tanh"})  # Tanh: logit soft-capping, softcap * tanh(scores / softcap) (Gemma 2)
# ops allowed between Softmax and the PV MatMul
_PROB_OPS = frozenset({"Cast", "Dropout", "Identity", "Where", "Reshape"})
# layout-only ops skipped when looking for the activation in front of fc2
LAYOUT_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast"})


@dataclass(frozen=True)
class AttentionCore:
    qk: int
    softmax: int
    pv: int
    q: str  # QK MatMul input 0
    k: str  # QK MatMul input 1 (K^T)
    v: str  # PV MatMul input that is not the probabilities
    pv_operands: tuple[Operand, Operand]  # ("p", "v") or ("v", "p"): the PV MatMul's inputs in order


@dataclass(frozen=True)
class Residual:
    add: int
    skip: str
    branch: str
    branch_nodes: frozenset[int]  # nodes on data paths from skip to branch (the Add excluded)


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
        p_first = i in probs_side
        v = g.nodes[pv].input[1] if p_first else g.nodes[pv].input[0]
        operands: tuple[Operand, Operand] = ("p", "v") if p_first else ("v", "p")
        found.append(AttentionCore(qk, i, pv, g.nodes[qk].input[0], g.nodes[qk].input[1], v, operands))
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
        else:
            merged = _side_branch(g, i, found, weight_gemms, confirmed)
            if merged is not None:
                confirmed.discard(found[-1].add)
                found[-1] = merged
                confirmed.add(i)
    return tuple(found)


def _side_branch(g: GraphIndex, i: int, found: list[Residual], weight_gemms: frozenset[int],
                 confirmed: set[int]) -> Residual | None:
    """The last residual ``r = x + a`` widened by Add ``i = r + m(x)``: a parallel block summed in that order
    (Cohere: ``x + attn(norm(x)) + mlp(norm(x))``), whose second branch also reads the skip ``x``."""
    if not found:
        return None
    last = found[-1]
    out = g.nodes[last.add].output[0]
    node = g.nodes[i]
    if out not in node.input:
        return None
    other = node.input[1] if node.input[0] == out else node.input[0]
    path = g.between(last.skip, other)
    if not path & weight_gemms or path & confirmed:
        return None
    return Residual(i, last.skip, other, last.branch_nodes | path | {last.add})


# Fused ops whose insides (attention core, residual + norm, weight dequantization) analysis cannot see; an
# ONNX Runtime transformer-optimized or already-quantized graph is refused with the node named.
OPAQUE_OPS: dict[str, str] = {
    "Attention": "a fused attention op (QK^T, softmax and PV are not visible)",
    "MultiHeadAttention": "a fused attention op (QK^T, softmax and PV are not visible)",
    "GroupQueryAttention": "a fused attention op (QK^T, softmax and PV are not visible)",
    "PackedAttention": "a fused attention op (QK^T, softmax and PV are not visible)",
    "PackedMultiHeadAttention": "a fused attention op (QK^T, softmax and PV are not visible)",
    "DecoderMaskedMultiHeadAttention": "a fused attention op (QK^T, softmax and PV are not visible)",
    "QAttention": "a quantized fused attention op",
    "SkipLayerNormalization": "a fused residual Add + LayerNorm (ONNX Runtime transformer optimizer)",
    "SkipSimplifiedLayerNormalization": "a fused residual Add + RMSNorm (ONNX Runtime transformer optimizer)",
    "EmbedLayerNormalization": "a fused embedding + LayerNorm (ONNX Runtime transformer optimizer)",
    "MatMulNBits": "a block-quantized weight GEMM (ONNX Runtime MatMulNBits)",
    "MatMulInteger": "an integer GEMM (the model is already quantized)",
    "QLinearMatMul": "an integer GEMM (the model is already quantized)",
    "DynamicQuantizeMatMul": "a dynamically quantized GEMM (the model is already quantized)",
    "MatMulIntegerToFloat": "an integer GEMM (the model is already quantized)",
    "QuantizeLinear": "activation quantization (the model is already Q/DQ quantized)",
}


def opaque_nodes(g: GraphIndex) -> tuple[tuple[int, str], ...]:
    """``(node, why)`` for every node analysis refuses (see :data:`OPAQUE_OPS`), in graph order."""
    return tuple((i, OPAQUE_OPS[n.op_type]) for i, n in enumerate(g.nodes) if n.op_type in OPAQUE_OPS)


@dataclass(frozen=True)
class Rotary:
    anchor: int  # the Add (decomposed) or the RotaryEmbedding node
    x: str  # the rotated tensor (Q or K, heads split)
    members: tuple[int, ...]
    fused: bool


def find_rotaries(g: GraphIndex) -> tuple[Rotary, ...]:
    """Every rotary embedding: ``Add(Mul(x, cos), Mul(Concat(Neg(Slice(x)), Slice(x)), sin))`` or the fused op."""
    found: list[Rotary] = []
    for i, node in enumerate(g.nodes):
        if node.op_type == "RotaryEmbedding":
            found.append(Rotary(i, node.input[0], (i,), True))
        elif node.op_type == "Add" and len(node.input) == 2:
            match = _rotary_add(g, i)
            if match is not None:
                found.append(match)
    return tuple(found)


def _rotary_add(g: GraphIndex, add: int) -> Rotary | None:
    muls = [g.producer_of(t) for t in g.nodes[add].input]
    if any(m is None or g.nodes[m].op_type != "Mul" for m in muls):
        return None
    for plain, rotated in ((muls[0], muls[1]), (muls[1], muls[0])):
        assert plain is not None and rotated is not None
        for x in g.nodes[plain].input:
            concat = next((c for t in g.nodes[rotated].input if (c := g.producer_of(t)) is not None
                           and g.nodes[c].op_type == "Concat"), None)
            if concat is None or g.is_const(x):
                continue
            halves = _rotate_half_members(g, concat, x)
            if halves is not None:
                return Rotary(add, x, tuple(sorted({add, plain, rotated, concat, *halves})), False)
    return None


def _rotate_half_members(g: GraphIndex, concat: int, x: str) -> set[int] | None:
    """Nodes of ``Concat(Neg(Slice(x)), Slice(x))`` (Split instead of Slice too), or None if it is not that."""
    members: set[int] = set()
    negated = 0
    for t in g.nodes[concat].input:
        j = g.producer_of(t)
        if j is not None and g.nodes[j].op_type == "Neg":
            members.add(j)
            negated += 1
            j = g.producer_of(g.nodes[j].input[0])
        if j is None or g.nodes[j].op_type not in ("Slice", "Split") or g.nodes[j].input[0] != x:
            return None
        members.add(j)
    return members if negated == 1 and len(g.nodes[concat].input) == 2 else None


_HEAD_SPLIT_RANK = 4


def reshape_tail(g: GraphIndex, reshape: int) -> tuple[int | None, int | None]:
    """The last two entries of a Reshape's target shape of rank >= 4 when they are constants (-1 and 0 read as
    None); (None, None) for a lower rank."""
    shape_in = g.nodes[reshape].input[1]
    values: list[int | None] = []
    j = g.producer_of(shape_in)
    if g.const_value(shape_in) is not None:
        values = list(_ints(g, shape_in))
    elif j is not None and g.nodes[j].op_type == "Concat":
        for t in g.nodes[j].input:
            values.extend(_ints(g, t) if g.const_value(t) is not None else [None])
    if len(values) < _HEAD_SPLIT_RANK:  # [batch, seq, heads, head_dim]; a flatten or unflatten is not a split
        return None, None
    tail = [v if v is not None and v > 0 else None for v in values[-2:]]
    return tail[0], tail[1]


def _ints(g: GraphIndex, tensor: str) -> list[int]:
    from onnx import numpy_helper

    value = g.const_value(tensor)
    assert value is not None
    return [int(v) for v in numpy_helper.to_array(value).reshape(-1)]
