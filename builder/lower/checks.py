"""Lowering stage: checks run after every lowering pass (ONNX checker plus our Q/DQ invariants).

Invariants (TensorRT's Q/DQ contract, TensorRT developer guide, explicit quantization):
  * every QuantizeLinear/DequantizeLinear has a constant, finite, strictly positive FP32 scale and a
    constant all-zero INT8 zero-point of the scale's shape;
  * activations are per tensor (scalar scale); a DequantizeLinear on an initializer is a per-channel
    weight: INT8 in [-127, 127], 1-D scale as long as the weight's ``axis`` dimension;
  * a weight DQ feeding a GEMM is per output channel (MatMul W[K, N]: axis 1; Gemm transB=1: axis 0),
    since a wrong-axis scale can be accepted silently by a builder;
  * a block-wise INT4 weight DQ (opset 21) has codes in [-7, 7] and FP32 block scales that tile the reduction
    axis (builder.quant.weight_common.check_block_weight_dq);
  * every QuantizeLinear feeds only DequantizeLinear nodes with bit-identical scales, or the input of a SPARQ
    composition (builder/lower/sparq_ops.py, found by its node metadata) whose INT8 output feeds only such
    DequantizeLinear nodes: INT8 codes in, trimmed INT8 codes out, so the pair still brackets INT8 values;
  * a SPARQ composition is closed: its nodes read only its input codes, its own tensors and constants, nothing
    outside reads its intermediate tensors, it ends in a Cast to INT8, and its input comes from a
    QuantizeLinear (or a plugin node with a ``scale`` attribute) whose scale its DequantizeLinear readers repeat.
"""

from __future__ import annotations

import numpy as np
import onnx

from builder.lower.graph_edit import GraphEditor
from builder.lower.sparq_ops import METADATA_KEY, METADATA_ROLE, SparqSpan, find_compositions
from builder.quant.weight_common import block_weight_dq, check_block_weight_dq
from calib.errors import BuildError, GraphError, InternalError


def _scale_and_zero(ed: GraphEditor, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    if len(node.input) < 3 or not node.input[2]:
        raise InternalError(f"{node.op_type} {node.name!r} has no explicit INT8 zero-point")
    scale = ed.constant_value(node.input[1])
    zero = ed.constant_value(node.input[2])
    if scale is None or zero is None:
        raise InternalError(f"{node.op_type} {node.name!r}: scale and zero-point must be constants")
    if scale.dtype != np.float32 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        raise InternalError(f"{node.op_type} {node.name!r}: scale must be finite, positive FP32 ({scale!r})")
    if zero.dtype != np.int8 or zero.shape != scale.shape or np.any(zero != 0):
        raise InternalError(f"{node.op_type} {node.name!r}: zero-point must be INT8 zeros shaped like the scale")
    return scale, zero


def _check_weight_dq(ed: GraphEditor, node: onnx.NodeProto, scale: np.ndarray) -> None:
    w = ed.initializer(node.input[0])
    assert w is not None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    if w.dtype != np.int8 or w.min(initial=0) < -127 or w.max(initial=0) > 127:
        raise InternalError(f"weight {node.input[0]!r}: INT8 weights must lie in [-127, 127]")
    if scale.ndim != 1 or not -w.ndim <= axis < w.ndim or scale.shape[0] != w.shape[axis]:
        raise InternalError(f"weight DQ {node.name!r}: scale of shape {scale.shape} does not match axis {axis} "
                            f"of weight shape {w.shape}")


def _output_channel_axis(reader: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The output-channel axis a weight must be quantized along for this reader (None: not a GEMM weight)."""
    if reader.op_type == "MatMul" and index == 1:
        return rank - 1  # MatMul(x, W[K, N]) -> N
    if reader.op_type == "Gemm" and index == 1:
        trans_b = next((a.i for a in reader.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def _check_weight_axis(node: onnx.NodeProto, readers: list[onnx.NodeProto], w_rank: int) -> None:
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % w_rank
    for reader in readers:
        for index, name in enumerate(reader.input):
            expected = _output_channel_axis(reader, index, w_rank) if name == node.output[0] else None
            if expected is not None and expected != axis:
                raise InternalError(f"weight DQ {node.name!r} is per-channel along axis {axis}, but "
                                    f"{reader.op_type} {reader.name!r} needs its output-channel axis {expected}")


def check_qdq_invariants(model: onnx.ModelProto) -> None:
    """Raise InternalError when a lowering pass broke the Q/DQ contract."""
    ed = GraphEditor(model)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if block_weight_dq(ed, node):  # a block-wise INT4 weight (builder.quant.weight_common)
            check_block_weight_dq(ed, node)
            continue
        scale, _ = _scale_and_zero(ed, node)
        weight = ed.initializer(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if weight is not None:
            _check_weight_dq(ed, node, scale)
            _check_weight_axis(node, consumers.get(node.output[0], []), weight.ndim)
            continue
        if scale.ndim != 0:
            raise InternalError(f"{node.op_type} {node.name!r}: activations take a per-tensor (scalar) scale")
        if node.op_type == "QuantizeLinear":
            for reader in consumers.get(node.output[0], []):
                if _span_input(reader) is None:
                    _check_dq_reader(ed, node, reader, scale)
    _check_sparq_compositions(model, ed, consumers)


def _check_dq_reader(ed: GraphEditor, node: onnx.NodeProto, reader: onnx.NodeProto, scale: np.ndarray) -> None:
    """``reader`` of INT8 codes that ``node`` quantized with ``scale`` is a DequantizeLinear with that scale."""
    if reader.op_type != "DequantizeLinear":
        raise InternalError(f"{node.op_type} {node.name!r} feeds {reader.op_type} {reader.name!r}")
    other = ed.constant_value(reader.input[1])
    if other is None or other.tobytes() != scale.tobytes():
        raise InternalError(f"Q/DQ pair {node.name!r} -> {reader.name!r} has unequal scales")


def _span_input(node: onnx.NodeProto) -> str | None:
    """The SPARQ composition prefix if ``node`` is the input node of one (its metadata), else None."""
    meta = {p.key: p.value for p in node.metadata_props}
    return meta.get(METADATA_KEY) if meta.get(METADATA_ROLE) == "input" else None


def _code_scale(ed: GraphEditor, producer: onnx.NodeProto | None, span: SparqSpan) -> np.ndarray:
    """The per-tensor scale of the INT8 codes a composition reads: its QuantizeLinear's (or plugin's)."""
    if producer is not None and producer.op_type == "QuantizeLinear":
        scale, _ = _scale_and_zero(ed, producer)
        return scale
    attr = None if producer is None else next((a for a in producer.attribute if a.name == "scale"), None)
    if producer is None or attr is None or producer.domain in ("", "ai.onnx"):
        raise InternalError(f"SPARQ composition {span.prefix!r} reads {span.input_name!r}, which no QuantizeLinear "
                            "(or quantizing plugin node) produces")
    return np.array(onnx.helper.get_attribute_value(attr), dtype=np.float32)


def _check_sparq_compositions(model: onnx.ModelProto, ed: GraphEditor,
                              consumers: dict[str, list[onnx.NodeProto]]) -> None:
    """Every SPARQ composition sits between INT8 codes of one scale and DequantizeLinear nodes of that scale."""
    try:
        spans = find_compositions(model.graph)
    except GraphError as exc:
        raise InternalError(f"a lowering pass broke a SPARQ composition: {exc}") from exc
    if not spans:
        return
    members: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        prefix = next((p.value for p in node.metadata_props if p.key == METADATA_KEY), None)
        if prefix is not None:
            members.setdefault(prefix, []).append(node)
    outputs = {o.name for o in model.graph.output}
    for span in spans:
        nodes = members[span.prefix]
        _check_span_closed(ed, span, nodes, consumers, outputs)
        producer = ed.producer(span.input_name)
        scale = _code_scale(ed, producer, span)
        readers = consumers.get(span.output_name, [])
        if not readers or span.output_name in outputs:
            raise InternalError(f"SPARQ composition {span.prefix!r}: its codes {span.output_name!r} must feed "
                                "DequantizeLinear nodes only")
        assert producer is not None
        for reader in readers:
            _check_dq_reader(ed, producer, reader, scale)


def _check_span_closed(ed: GraphEditor, span: SparqSpan, nodes: list[onnx.NodeProto],
                       consumers: dict[str, list[onnx.NodeProto]], outputs: set[str]) -> None:
    produced = {o for n in nodes for o in n.output}
    ids = {id(n) for n in nodes}
    for node in nodes:
        for name in node.input:
            if name and name != span.input_name and name not in produced and ed.constant_value(name) is None:
                raise InternalError(f"SPARQ composition {span.prefix!r}: node {node.name!r} reads {name!r} from "
                                    "outside the composition")
    for name in produced - {span.output_name}:
        if name in outputs or any(id(r) not in ids for r in consumers.get(name, [])):
            raise InternalError(f"SPARQ composition {span.prefix!r}: its intermediate {name!r} is read outside it")
    last = next(n for n in nodes if span.output_name in n.output)
    to = next((a.i for a in last.attribute if a.name == "to"), None)
    if last.op_type != "Cast" or to != onnx.TensorProto.INT8:
        raise InternalError(f"SPARQ composition {span.prefix!r} must end in a Cast to INT8, not {last.op_type!r}")


def check_model(model: onnx.ModelProto, stage: str) -> None:
    """ONNX checker (with shape inference) plus the Q/DQ invariants, naming the pass that ran last."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BuildError(f"after lowering pass {stage!r} the graph is not valid ONNX: {exc}") from exc
    check_qdq_invariants(model)
