"""Lowering stage: Q/DQ insertion (per-tensor activations) and INT8 per-channel weight initializers.

TensorRT's contract (PLATFORM.md section 3): symmetric, zero-point 0 of type INT8, FP32 scales, per-channel
only on weights (axis = output channel of the weight as stored), activations per tensor, weights in
[-127, 127] stored as INT8 initializers behind a DequantizeLinear.

    act:     x -> QuantizeLinear(s) -> DequantizeLinear(s) -> GEMM
    centered x -> Sub(c) -> QuantizeLinear(s) -> DequantizeLinear(s) -> GEMM -> Add(bias + c * colsum(W))
    weight:  W_int8 (initializer) -> DequantizeLinear(s[axis]) -> GEMM
"""

from __future__ import annotations

import numpy as np

from builder.lower.graph_edit import GraphEditor
from builder.plan.artifact import ALL_CONSUMERS, ActivationQuant, QuantPlan
from builder.recipes.model import Scheme
from calib.errors import BuildError
from calib.quant import quantize, scale_from_amax


def act_scale(amax: float) -> np.float32:
    """The FP32 activation scale float32(amax / 127) (calib.quant's convention)."""
    return scale_from_amax(amax)


def quantize_weight(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel INT8 of ``w`` along ``axis``: (int8 values in [-127, 127], float32 scales).

    scale_c = float32(max|w[..c..]| / 127) (a zero channel gets scale 1);
    q = clip(round_half_even(w / scale), -127, 127) in float32, as TensorRT quantizes.
    """
    w = np.asarray(w, dtype=np.float32)
    reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.max(np.abs(w), axis=reduce_axes).astype(np.float64)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    return quantize(w, scale.reshape(shape), narrow=True), scale


def insert_qdq(ed: GraphEditor, tensor: str, amax: float, consumers: tuple[str, ...], tag: str = "",
               offset: float = 0.0) -> str:
    """Insert Q -> DQ on ``tensor``; rewire ``consumers`` (``("*",)``: every reader). Returns the DQ output.

    With an ``offset`` c (centered edges, named consumers only) the pair quantizes ``Sub(tensor, c)``; the
    consumers' biases absorb c afterwards (:func:`builder.lower.center.fold_offsets`).
    """
    base = tensor + tag
    scale = ed.add_initializer(f"{base}_scale", np.array(act_scale(amax), dtype=np.float32))
    zero = ed.add_initializer(f"{base}_zero_point", np.array(0, dtype=np.int8))
    if consumers == (ALL_CONSUMERS,):
        if offset:
            raise BuildError(f"tensor {tensor!r}: a centered Q/DQ needs named GEMM consumers to fold its offset into")
        source = ed.unique(f"{base}_prequant")
        if ed.producer(tensor) is None:
            raise BuildError(f"cannot quantize graph input {tensor!r} for every consumer")
        ed.rename_output(tensor, source)
        quantized = ed.unique(f"{base}_quantized")
        ed.add_node("QuantizeLinear", [source, scale, zero], [quantized], name=f"{base}_QuantizeLinear")
        ed.add_node("DequantizeLinear", [quantized, scale, zero], [tensor], name=f"{base}_DequantizeLinear")
        return tensor
    source = tensor
    if offset:
        center = ed.add_initializer(f"{base}_center", np.array(offset, dtype=np.float32))
        source = ed.unique(f"{base}_centered")
        ed.add_node("Sub", [tensor, center], [source], name=f"{base}_Center")
    quantized = ed.unique(f"{base}_quantized")
    dequantized = ed.unique(f"{base}_dequantized")
    ed.add_node("QuantizeLinear", [source, scale, zero], [quantized], name=f"{base}_QuantizeLinear")
    ed.add_node("DequantizeLinear", [quantized, scale, zero], [dequantized], name=f"{base}_DequantizeLinear")
    for name in consumers:
        node = ed.node(name)
        if tensor not in node.input:
            raise BuildError(f"plan says node {name!r} reads {tensor!r}, but it does not")
        GraphEditor.replace_input(node, tensor, dequantized)
    return dequantized


def insert_weight_dq(ed: GraphEditor, node_name: str, axis: int, weight_cache: dict[str, str]) -> None:
    """Replace the float weight initializer of GEMM ``node_name`` by INT8 + DequantizeLinear(axis)."""
    node = ed.node(node_name)
    index = next((i for i, t in enumerate(node.input) if ed.initializer(t) is not None), None)
    if index is None:
        raise BuildError(f"GEMM {node_name!r} has no weight initializer to quantize")
    weight = node.input[index]
    if weight not in weight_cache:
        w = ed.initializer(weight)
        assert w is not None
        if not -w.ndim <= axis < w.ndim:
            raise BuildError(f"weight {weight!r} of shape {w.shape}: channel axis {axis} is out of range")
        q, scale = quantize_weight(w, axis)
        q_name = ed.add_initializer(f"{weight}_int8", q)
        s_name = ed.add_initializer(f"{weight}_scale", scale)
        z_name = ed.add_initializer(f"{weight}_zero_point", np.zeros(scale.shape, dtype=np.int8))
        out = ed.unique(f"{weight}_dequantized")
        ed.add_node("DequantizeLinear", [q_name, s_name, z_name], [out], name=f"{weight}_DequantizeLinear",
                    axis=axis % w.ndim)
        weight_cache[weight] = out
    node.input[index] = weight_cache[weight]


def lower_tensor_activations(ed: GraphEditor, plan: QuantPlan) -> None:
    """Insert Q/DQ for every per-tensor activation edge of the plan."""
    for act in plan.activations:
        if act.scheme == Scheme.TENSOR:
            insert_qdq(ed, act.tensor, act.amax, act.consumers, offset=act.offset)


def lower_weights(ed: GraphEditor, plan: QuantPlan, skip: set[str]) -> None:
    """INT8 per-channel weights for every planned GEMM (nodes in ``skip`` were handled by another pass)."""
    cache: dict[str, str] = {}
    for wq in plan.weights:
        if wq.node not in skip:
            insert_weight_dq(ed, wq.node, wq.axis, cache)


def activation_by_tensor(plan: QuantPlan) -> dict[str, ActivationQuant]:
    return {a.tensor: a for a in plan.activations}
