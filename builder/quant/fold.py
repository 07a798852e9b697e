"""Quantizer lowering (shared by HERO FWQ and SmoothQuant-style migration): per-feature scales folded away.

A GEMM input X with per-feature scales S is quantized per tensor as X / S, and S moves into the rows of
every consuming weight (the quantizer's weight view diag(S).W; Xiao et al. 2022, arXiv 2211.10438,
section 4; Yao et al. 2023, arXiv 2310.17723, section 3). What remains is dividing X by S, which these
rules fold into the producer of X, so no runtime op is left:

    norm    LN(x) / S  = x_hat * (gamma / S) + beta / S       LayerNormalization (gamma, beta inputs)
            RMS(x) / S = x_hat * (gamma / S)                   RMSNormalization, SimplifiedLayerNormalization
                                                               (com.microsoft): the scale input
            (y * g) / S = y * (g / S)                          decomposed norms: the final Mul by a constant
            (y * g + b) / S = y * (g / S) + b / S              per-feature weight (and the Add of a bias)
    gated   (SiLU(x W_g) * (x W_u)) / S = SiLU(x W_g) * (x W_u diag(1/S))
                                                               the up projection's output channels (its
                                                               per-channel INT8 weight scales, or its float
                                                               weight columns, and its bias)
    other   an explicit Mul by 1/S (a runtime op a builder fuses into the producer's epilogue)

The new constants are always fresh initializers read only by the rewritten node, so a norm weight the exporter
shares between several norms (directly, or through Identity nodes) is un-shared first: the other norms keep
the original. The producer is rewritten in place when the quantized readers are all its readers; otherwise
the folded part (the norm node, or its final Mul / Mul + Add) is duplicated and the original keeps feeding
the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import onnx

from calib.errors import BuildError

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.lower.graph_edit import GraphEditor

# fused norm op -> (gamma input index, beta input index or None)
FUSED_NORMS: dict[tuple[str, str], tuple[int, int | None]] = {
    ("", "LayerNormalization"): (1, 2),
    ("", "RMSNormalization"): (1, None),
    ("com.microsoft", "SimplifiedLayerNormalization"): (1, None),
}


def resolve_constant(ed: GraphEditor, tensor: str) -> np.ndarray | None:
    """The value of an initializer or Constant output, looking through Identity chains (exporters dedupe
    equal initializers behind Identity nodes); None when ``tensor`` is not constant."""
    seen = 0
    while seen < 64:
        value = ed.constant_value(tensor)
        if value is not None:
            return value
        producer = ed.producer(tensor)
        if producer is None or producer.op_type != "Identity" or not producer.input:
            return None
        tensor, seen = producer.input[0], seen + 1
    return None


def _feature_vector(value: np.ndarray | None, features: int) -> bool:
    """A constant that scales the last axis feature by feature ([F] or [1, ..., 1, F])."""
    return (value is not None and value.size == features and value.ndim >= 1 and value.shape[-1] == features
            and np.issubdtype(value.dtype, np.floating))


@dataclass(frozen=True)
class NormFold:
    """Where 1/S goes in a norm: the node(s) to rewrite and the inputs holding gamma and beta."""

    kind: str  # "fused", "mul" (decomposed: final Mul by gamma) or "mul_add" (Mul by gamma, then Add of beta)
    nodes: tuple[onnx.NodeProto, ...]  # fused: (norm,); mul: (mul,); mul_add: (mul, add)
    gamma: tuple[int, int]  # (index into nodes, input index)
    beta: tuple[int, int] | None


def find_norm(ed: GraphEditor, tensor: str, features: int, *, decomposed: bool = True) -> NormFold | None:
    """The norm producing ``tensor`` whose weight (and bias) can absorb 1/S, or None."""
    producer = ed.producer(tensor)
    if producer is None:
        return None
    fused = FUSED_NORMS.get((producer.domain or "", producer.op_type))
    if fused is not None:
        g_index, b_fused = fused
        if len(producer.input) <= g_index or not _feature_vector(resolve_constant(ed, producer.input[g_index]),
                                                                 features):
            return None
        beta = None
        if b_fused is not None and len(producer.input) > b_fused and producer.input[b_fused]:
            if not _feature_vector(resolve_constant(ed, producer.input[b_fused]), features):
                return None
            beta = (0, b_fused)
        return NormFold("fused", (producer,), (0, g_index), beta)
    if not decomposed:
        return None
    if producer.op_type == "Mul":
        index = _const_operand(ed, producer, features)
        return None if index is None else NormFold("mul", (producer,), (0, index), None)
    if producer.op_type == "Add":
        b_index = _const_operand(ed, producer, features)
        if b_index is None:
            return None
        mul = ed.producer(producer.input[1 - b_index])
        if mul is None or mul.op_type != "Mul":
            return None
        gamma = _const_operand(ed, mul, features)
        return None if gamma is None else NormFold("mul_add", (mul, producer), (0, gamma), (1, b_index))
    return None


def _const_operand(ed: GraphEditor, node: onnx.NodeProto, features: int) -> int | None:
    """Index of the one constant per-feature operand of a binary node whose other operand is an activation."""
    if len(node.input) != 2:
        return None
    consts = [i for i, t in enumerate(node.input) if resolve_constant(ed, t) is not None]
    if len(consts) != 1 or not _feature_vector(resolve_constant(ed, node.input[consts[0]]), features):
        return None
    return consts[0]


def fold_norm(ed: GraphEditor, fold: NormFold, tensor: str, scale: np.ndarray, tag: str, *,
              in_place: bool) -> str:
    """Rewrite (``in_place``) or duplicate the norm so that it outputs ``tensor / scale``; returns that tensor.

    In place, the producer writes a new tensor and ``tensor`` is left without a producer: the caller rewires
    (or restores) every reader of ``tensor``.
    """
    new_inputs: list[list[str]] = [list(n.input) for n in fold.nodes]
    for where in (fold.gamma, fold.beta):
        if where is None:
            continue
        node_i, input_i = where
        name = fold.nodes[node_i].input[input_i]
        value = resolve_constant(ed, name)
        assert value is not None
        divided = (value / scale.reshape(value.shape)).astype(value.dtype)
        new_inputs[node_i][input_i] = ed.add_initializer(f"{name}_{tag}", divided)
    out = ed.unique(f"{tensor}_{tag}")
    last = len(fold.nodes) - 1
    if fold.kind == "mul_add" and len(ed.consumers(fold.nodes[0].output[0])) != 1:
        in_place = False  # the Mul's output has other readers: it cannot change, so both nodes are duplicated
    if in_place:
        for node, inputs in zip(fold.nodes, new_inputs, strict=True):
            replaced = [t for t in node.input if t not in inputs]
            del node.input[:]
            node.input.extend(inputs)
            for name in replaced:
                _drop_unread_identity(ed, name)
        ed.rename_output(tensor, out)
        return out
    source = ""
    for index, (node, inputs) in enumerate(zip(fold.nodes, new_inputs, strict=True)):
        if index > 0:
            inputs = [source if t == fold.nodes[index - 1].output[0] else t for t in inputs]
        target = out if index == last else ed.unique(f"{node.output[0]}_{tag}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ed.add_node(node.op_type, inputs, [target], name=f"{node.name}_{tag}", domain=node.domain, **attrs)
        source = target
    return out


def _drop_unread_identity(ed: GraphEditor, tensor: str) -> None:
    """Remove the Identity chain that produced ``tensor`` once nothing reads it (an un-shared norm weight)."""
    producer = ed.producer(tensor)
    while producer is not None and producer.op_type == "Identity" and not ed.consumers(tensor) \
            and not ed.is_graph_output(tensor):
        tensor = producer.input[0]
        ed.remove_node(producer)
        producer = ed.producer(tensor)


@dataclass(frozen=True)
class GatedFold:
    """The up projection of a gated MLP whose output channels can absorb 1/S of the product."""

    up: str  # GEMM node name
    bias_add: str | None  # the Add of a bias between the GEMM and the product, if any


def find_gated_up(ed: GraphEditor, tensor: str, features: int) -> GatedFold | None:
    """``tensor = Mul(act, up)`` with ``up`` a weight GEMM's output (maybe plus a bias) read only by that Mul."""
    producer = ed.producer(tensor)
    if producer is None or producer.op_type != "Mul" or len(producer.input) != 2:
        return None
    for operand in producer.input:
        if len(ed.consumers(operand)) != 1 or ed.is_graph_output(operand):
            continue
        node, bias_add = ed.producer(operand), None
        if node is not None and node.op_type == "Add" and _const_operand(ed, node, features) is not None:
            inner = node.input[1 - (_const_operand(ed, node, features) or 0)]
            if len(ed.consumers(inner)) == 1 and not ed.is_graph_output(inner):
                bias_add, node = node.name, ed.producer(inner)
        if node is not None and _weight_gemm(ed, node, features):
            return GatedFold(up=node.name, bias_add=bias_add)
    return None


def _out_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of a 2-D GEMM weight: MatMul B [K, N] -> 1; Gemm with transB=1 -> 0."""
    trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    return 0 if trans_b else 1


def _weight_gemm(ed: GraphEditor, node: onnx.NodeProto, features: int) -> bool:
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return False
    weight = resolve_constant(ed, node.input[1])
    return weight is not None and weight.ndim == 2 and weight.shape[_out_axis(node)] == features


def scale_output_channels(ctx: LoweringContext, fold: GatedFold, factor: np.ndarray, tag: str) -> None:
    """Multiply the output channels of GEMM ``fold.up`` by ``factor``: its INT8 weight's per-channel scales
    (exact: the integers are unchanged), or its float weight's columns, and its bias. Runs after the weights
    are written (:meth:`LoweringContext.after_weights`)."""
    ed = ctx.ed
    node = ed.node(fold.up)
    axis = _out_axis(node)
    weight = node.input[1]
    value = resolve_constant(ed, weight)
    if value is not None:
        node.input[1] = ed.add_initializer(f"{weight}_{tag}", _along(value, factor, axis))
    else:
        _scale_dequantize(ed, node, factor, axis, tag)
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = resolve_constant(ed, node.input[2])
        if bias is None:
            raise BuildError(f"GEMM {node.name!r}: its C input is not constant, so 1/S cannot be folded into it")
        node.input[2] = ed.add_initializer(f"{node.input[2]}_{tag}", _along(bias, factor, bias.ndim - 1))
    if fold.bias_add is not None:
        add = ed.node(fold.bias_add)
        index = next(i for i, t in enumerate(add.input) if resolve_constant(ed, t) is not None)
        bias = resolve_constant(ed, add.input[index])
        assert bias is not None
        add.input[index] = ed.add_initializer(f"{add.input[index]}_{tag}", _along(bias, factor, bias.ndim - 1))


def _along(value: np.ndarray, factor: np.ndarray, axis: int) -> np.ndarray:
    shape = [1] * value.ndim
    shape[axis] = -1
    out: np.ndarray = (value * factor.reshape(shape)).astype(value.dtype)
    return out


def _scale_dequantize(ed: GraphEditor, node: onnx.NodeProto, factor: np.ndarray, axis: int, tag: str) -> None:
    """The GEMM reads DequantizeLinear(int8, scale): a new scale (scale * factor along the output axis)."""
    dq = ed.producer(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        raise BuildError(f"GEMM {node.name!r}: its weight is neither a constant nor a DequantizeLinear, so its output "
                         "channels cannot absorb the feature scales")
    scale = resolve_constant(ed, dq.input[1])
    dq_axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    block = next((a.i for a in dq.attribute if a.name == "block_size"), 0)
    if scale is None:
        raise BuildError(f"DequantizeLinear {dq.name!r} has no constant scale")
    if scale.ndim == 1 and not block and dq_axis % 2 == axis:
        new_scale = (scale * factor).astype(scale.dtype)
    elif scale.ndim == 2:
        new_scale = _along(scale, factor, axis)
    else:
        raise BuildError(f"DequantizeLinear {dq.name!r}: a per-tensor or per-row weight scale cannot absorb "
                         "per-output-channel factors; quantize the weight per output channel")
    scale_name = ed.add_initializer(f"{dq.input[1]}_{tag}", new_scale)
    if len(ed.consumers(dq.output[0])) == 1:
        dq.input[1] = scale_name
        return
    inputs = list(dq.input)
    inputs[1] = scale_name
    out = ed.unique(f"{dq.output[0]}_{tag}")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    ed.add_node("DequantizeLinear", inputs, [out], name=f"{dq.name}_{tag}", **attrs)
    ed.replace_input(node, node.input[1], out)


def explicit_divide(ed: GraphEditor, tensor: str, scale: np.ndarray, tag: str, *, rename: bool) -> str:
    """``tensor * (1/S)`` through a Mul node (the fallback). With ``rename`` the producer writes a new tensor
    and the Mul reads that (``tensor`` is left without a producer for the caller to restore)."""
    if rename and ed.producer(tensor) is not None:
        raw = ed.unique(f"{tensor}_raw")
        ed.rename_output(tensor, raw)
    else:
        raw = tensor
    inv = ed.add_initializer(f"{tensor}_{tag}_inv_scale", (1.0 / scale).astype(np.float32))
    out = ed.unique(f"{tensor}_{tag}")
    ed.add_node("Mul", [raw, inv], [out], name=f"{tensor}_{tag}_Mul")
    return out


def restore(ed: GraphEditor, source: str, scale: np.ndarray, tensor: str, tag: str) -> None:
    """``tensor = source * S``: the readers that are not quantized get the unscaled value back."""
    s_name = ed.add_initializer(f"{tensor}_{tag}_scale", scale.astype(np.float32))
    ed.add_node("Mul", [source, s_name], [tensor], name=f"{tensor}_{tag}_restore")


class Folded(NamedTuple):
    """What :func:`fold_divide` did."""

    source: str  # the tensor equal to X / S that the quantized readers read
    detached: bool  # ``tensor`` lost its producer: the caller restores it for its other readers (or none read it)
    kind: str  # "norm", "gated" or "mul" (the explicit Mul: a runtime op)


def fold_divide(ctx: LoweringContext, tensor: str, scale: np.ndarray, tag: str, *, in_place: bool,
                rename_mul: bool | None = None) -> Folded:
    """A tensor equal to ``tensor / scale`` for the quantized readers, folded into the producer where one of the
    rules above applies, else through an explicit Mul (see :class:`Folded`).

    ``in_place``: the quantized readers are all of ``tensor``'s readers (or, for an output edge, every reader is
    served by the caller's restore), so the producer may change. ``rename_mul`` (default ``in_place``): whether the
    explicit Mul takes over ``tensor``'s producer (a restored output edge) or reads ``tensor`` beside it.
    """
    ed = ctx.ed
    norm = find_norm(ed, tensor, scale.size)
    if norm is not None:
        out = fold_norm(ed, norm, tensor, scale, tag, in_place=in_place)
        return Folded(out, ed.producer(tensor) is None, "norm")
    gated = find_gated_up(ed, tensor, scale.size)
    if gated is not None:
        _check_no_centered_input(ctx, gated.up)
        factor = (1.0 / scale.astype(np.float64)).astype(np.float32)
        ctx.after_weights(lambda: scale_output_channels(ctx, gated, factor, tag))
        out = ed.unique(f"{tensor}_{tag}")
        ed.rename_output(tensor, out)
        return Folded(out, True, "gated")
    rename = in_place if rename_mul is None else rename_mul
    out = explicit_divide(ed, tensor, scale, tag, rename=rename)
    return Folded(out, rename and ed.producer(tensor) is None, "mul")


def scale_rows(weight: np.ndarray, axis: int, scale: np.ndarray) -> np.ndarray:
    """diag(S).W in the stored layout of a 2-D weight whose output channels lie along ``axis``."""
    rows = 1 - axis  # the reduction axis of the stored 2-D weight
    if weight.ndim != 2 or weight.shape[rows] != scale.size:
        raise BuildError(f"cannot fold {scale.size} feature scales into a weight of shape {weight.shape}")
    folded: np.ndarray = (weight * (scale[None, :] if rows == 1 else scale[:, None])).astype(weight.dtype)
    return folded


def _check_no_centered_input(ctx: LoweringContext, up: str) -> None:
    """A centered input edge folds c * colsum(W_dq) into the GEMM's bias from the unscaled weight: refuse it."""
    planned = ctx.weight_edge(up)
    if planned is None:
        return
    edge = next((a for a in ctx.plan.activations if a.tensor == planned.input), None)
    if edge is not None and edge.quantizer == "centered":
        raise BuildError(f"GEMM {up!r}: its output channels absorb the feature scales of the next GEMM's input, "
                         "which its centered input edge cannot follow; quantize its input with static, fwq or smooth")
