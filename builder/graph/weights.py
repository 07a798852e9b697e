"""Analysis stage: weight GEMMs and where their weights come from (path, sharing, weight-only quantization).

A weight GEMM is ``MatMul(x, B)`` / ``Gemm(x, B)`` whose ``B`` is a constant expression of one initializer
``W``, reached backwards through *path* nodes::

    W(float) --[Identity | Cast | Transpose(2-D)]*--> B                              plain (maybe tied) weight
    W(int)   --DequantizeLinear(s[, zp])--[Transpose]*--> B                          weight-only quantized
    W(int)   --Cast(float)--[Sub(zp)]--Mul(s)--[Transpose]*--> B                      weight-only quantized

Every other node that reads ``W`` through its own path (the embedding ``Gather`` of a tied LM head, a second
GEMM) *shares* it. Only initializer shapes and element types are read, never weight values, so analysis
works on a model whose external data is not loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from onnx import NodeProto, TensorProto

from builder.graph.topology import GraphIndex

INTEGER_TYPES = frozenset({TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
                           TensorProto.INT32, TensorProto.INT4, TensorProto.UINT4})
_UNARY_PATH_OPS = frozenset({"Identity", "Cast", "Transpose", "DequantizeLinear"})
_SCALE_OPS = frozenset({"Mul", "Sub", "Div"})  # scale / zero-point arithmetic on a weight
_MAX_PATH = 8


class WeightKind(StrEnum):
    FLOAT = "float"  # a float initializer, maybe behind Identity / Cast / Transpose
    DEQUANTIZED = "dequantized"  # an integer initializer dequantized on the path (weight-only quantized)
    COMPUTED = "computed"  # a float initializer changed by arithmetic on the path (not a plain weight)


@dataclass(frozen=True)
class WeightSource:
    """The initializer behind a GEMM's B input and the nodes in between (initializer first)."""

    initializer: str
    path: tuple[int, ...]
    transposed: bool  # an odd number of 2-D Transposes on the path
    kind: WeightKind


@dataclass(frozen=True)
class WeightGemm:
    """A GEMM with a constant weight."""

    node: int
    x: str  # activation input
    weight: str  # initializer name
    weight_axis: int  # axis of the initializer that keeps one scale per output channel
    in_features: int
    out_features: int
    bias_add: int | None  # Add node adding a constant bias right after the GEMM
    out: str  # output of the unit (after the bias Add when there is one)
    path: tuple[int, ...]  # nodes between the initializer and the GEMM, initializer side first
    kind: WeightKind


def _chain_input(g: GraphIndex, i: int) -> str | None:
    """The one input of path node ``i`` that carries the weight (the others must be constants)."""
    node = g.nodes[i]
    if node.op_type in _UNARY_PATH_OPS:
        if node.op_type == "Transpose":
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            if perm not in ([], [[1, 0]]):
                return None
        rest = [t for t in node.input[1:] if t]
        return node.input[0] if all(g.is_const(t) for t in rest) else None
    if node.op_type in _SCALE_OPS and len(node.input) == 2:
        a, b = str(node.input[0]), str(node.input[1])
        if g.is_const(a) and g.is_const(b):  # W * s with both initializers: the larger one is the weight
            size_a, size_b = (_size(g.const_shape(t)) for t in (a, b))
            return b if node.op_type == "Mul" and size_b > size_a else a
        if g.is_const(b):
            return a
        if node.op_type == "Mul" and g.is_const(a):
            return b
    return None


def _size(shape: tuple[int, ...] | None) -> int:
    size = 1
    for d in shape or (0,):
        size *= d
    return size


def trace_weight(g: GraphIndex, tensor: str) -> WeightSource | None:
    """The initializer behind ``tensor`` if it is a constant expression of one initializer, else None."""
    path: list[int] = []
    transposed = False
    t = tensor
    for _ in range(_MAX_PATH + 1):
        if g.root(t) in g.initializers:
            break
        j = g.producer_of(t)
        if j is None or len(path) == _MAX_PATH:
            return None
        nxt = _chain_input(g, j)
        if nxt is None:
            return None
        transposed ^= g.nodes[j].op_type == "Transpose"
        path.append(j)
        t = nxt
    root = g.root(t)
    shape = g.const_shape(root)
    has_transpose = any(g.nodes[j].op_type == "Transpose" for j in path)
    if shape is None or (has_transpose and len(shape) != 2):
        return None
    ops = {g.nodes[j].op_type for j in path}
    if g.const_dtype(root) in INTEGER_TYPES:
        kind = WeightKind.DEQUANTIZED
    elif ops & (_SCALE_OPS | {"DequantizeLinear"}):
        kind = WeightKind.COMPUTED
    else:
        kind = WeightKind.FLOAT
    path.reverse()
    return WeightSource(root, tuple(path), transposed, kind)


def find_weight_gemms(g: GraphIndex) -> tuple[WeightGemm, ...]:
    """Every MatMul/Gemm whose B input is a constant expression of one initializer, in graph order."""
    found: list[WeightGemm] = []
    for i, node in enumerate(g.nodes):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or g.is_const(node.input[0]):
            continue
        if g.producer_of(node.input[0]) is not None and trace_weight(g, node.input[0]) is not None:
            continue  # A is a constant expression too
        source = trace_weight(g, node.input[1])
        if source is None:
            continue
        shape = g.const_shape(source.initializer)
        assert shape is not None  # trace_weight checked it
        if len(shape) < 2:
            continue
        axis, in_features = _axis_and_k(node, shape, source.transposed)
        bias_add = _bias_add(g, node.output[0])
        out = g.nodes[bias_add].output[0] if bias_add is not None else node.output[0]
        found.append(WeightGemm(i, node.input[0], source.initializer, axis, in_features, shape[axis], bias_add, out,
                                source.path, source.kind))
    return tuple(found)


def _axis_and_k(node: NodeProto, shape: tuple[int, ...], transposed: bool) -> tuple[int, int]:
    """(output-channel axis of the initializer, K). ``MatMul(x, W[K, N])``: axis 1; ``Gemm`` transB or a
    Transpose on the path flips it (``W[N, K]``: axis 0)."""
    flipped = transposed
    if node.op_type == "Gemm":
        flipped ^= any(a.name == "transB" and a.i == 1 for a in node.attribute)
        return (0, shape[1]) if flipped else (1, shape[0])
    if flipped:
        return (0, shape[1])
    last = len(shape) - 1
    return (last, shape[last - 1])


def _bias_add(g: GraphIndex, out: str) -> int | None:
    j = g.sole_consumer(out)
    if j is None or g.nodes[j].op_type != "Add":
        return None
    other = [t for t in g.nodes[j].input if t != out]
    return j if len(other) == 1 and g.is_const(other[0]) else None


def weight_readers(g: GraphIndex, initializer: str) -> tuple[int, ...]:
    """Every node that reads ``initializer`` through a path (Identity, Cast, Transpose, dequantization), sorted."""
    readers: set[int] = set()
    seen: set[int] = set()
    queue = [initializer]
    while queue:
        t = queue.pop()
        for j in g.consumers_of(t):
            if j in seen:
                continue
            seen.add(j)
            if _chain_input(g, j) == t:
                queue.extend(o for o in g.nodes[j].output if o)
            else:
                readers.add(j)
    return tuple(sorted(readers))
