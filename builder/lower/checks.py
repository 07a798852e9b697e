"""Lowering stage: checks run after every lowering pass (ONNX checker plus our Q/DQ invariants).

Invariants (TensorRT's Q/DQ contract, PLATFORM.md section 3):
  * every QuantizeLinear/DequantizeLinear has a constant, finite, strictly positive FP32 scale and a
    constant all-zero INT8 zero-point of the scale's shape;
  * activations are per tensor (scalar scale); a DequantizeLinear on an initializer is a per-channel
    weight: INT8 in [-127, 127], 1-D scale as long as the weight's ``axis`` dimension;
  * a weight DQ feeding a GEMM is per output channel (MatMul W[K, N]: axis 1; Gemm transB=1: axis 0),
    since a wrong-axis scale can be accepted silently by a builder;
  * every QuantizeLinear feeds only DequantizeLinear nodes with bit-identical scales.
"""

from __future__ import annotations

import numpy as np
import onnx

from builder.lower.graph_edit import GraphEditor
from calib.errors import BuildError, InternalError


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
                if reader.op_type != "DequantizeLinear":
                    raise InternalError(f"QuantizeLinear {node.name!r} feeds {reader.op_type} {reader.name!r}")
                other = ed.constant_value(reader.input[1])
                if other is None or other.tobytes() != scale.tobytes():
                    raise InternalError(f"Q/DQ pair {node.name!r} -> {reader.name!r} has unequal scales")


def check_model(model: onnx.ModelProto, stage: str) -> None:
    """ONNX checker (with shape inference) plus the Q/DQ invariants, naming the pass that ran last."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BuildError(f"after lowering pass {stage!r} the graph is not valid ONNX: {exc}") from exc
    check_qdq_invariants(model)
