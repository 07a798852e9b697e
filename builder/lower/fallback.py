"""Lowering stage: FP16/BF16 fallback with Casts, and the whole-graph FP16 conversion (FP16 baseline).

Strongly typed TensorRT runs a layer in its inputs' dtype (TensorRT developer guide, strong typing), so a
fallback node gets its float activations cast to the 16-bit type, its float initializers stored in that type,
and its outputs cast back. Float constants are clamped to the 16-bit range first: an FP32 attention-mask
constant (-3.4e38) would otherwise become -inf, and 0 * -inf = NaN.

    x --Cast(fp16)--> node(W_fp16) --Cast(fp32)--> y

Back-to-back Cast(fp32) -> Cast(fp16) pairs between two fallback nodes are removed afterwards (exact: every
FP16 value is representable in FP32).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from builder.lower.graph_edit import GraphEditor
from builder.plan.artifact import QuantPlan
from builder.recipes.model import Precision

_DTYPES = {Precision.FP16: TensorProto.FLOAT16, Precision.BF16: TensorProto.BFLOAT16}
_F16_MAX = 65504.0
_BF16_MAX = 3.3895313892515355e38


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types: dict[str, int] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def _to_low(array: np.ndarray, dtype: int) -> onnx.TensorProto:
    """A float array as an FP16 or BF16 TensorProto, clamped to the type's finite range."""
    if dtype == TensorProto.FLOAT16:
        return numpy_helper.from_array(np.clip(array, -_F16_MAX, _F16_MAX).astype(np.float16))
    clipped = np.clip(array.astype(np.float32), -_BF16_MAX, _BF16_MAX)
    bits = (clipped.view(np.uint32) + 0x7FFF + ((clipped.view(np.uint32) >> 16) & 1)) >> 16  # round half even
    raw = bits.astype("<u2").tobytes()
    return onnx.helper.make_tensor("", TensorProto.BFLOAT16, list(array.shape), raw, raw=True)


def _low_initializer(ed: GraphEditor, name: str, dtype: int, cache: dict[tuple[str, int], str]) -> str:
    key = (name, dtype)
    if key not in cache:
        value = ed.constant_value(name)
        assert value is not None
        tensor = _to_low(value, dtype)
        tensor.name = ed.unique(f"{name}_{'fp16' if dtype == TensorProto.FLOAT16 else 'bf16'}")
        ed.graph.initializer.append(tensor)
        ed._inits[tensor.name] = ed.graph.initializer[-1]
        cache[key] = tensor.name
    return cache[key]


def _cast(ed: GraphEditor, tensor: str, to: int, cache: dict[tuple[str, int], str]) -> str:
    key = (tensor, to)
    if key not in cache:
        suffixes = {int(TensorProto.FLOAT16): "fp16", int(TensorProto.BFLOAT16): "bf16", int(TensorProto.FLOAT): "fp32"}
        suffix = suffixes[to]
        out = ed.unique(f"{tensor}_to_{suffix}")
        ed.add_node("Cast", [tensor], [out], name=f"{tensor}_Cast_{suffix}", to=to)
        cache[key] = out
    return cache[key]


def cast_node(ed: GraphEditor, node: onnx.NodeProto, dtype: int, types: dict[str, int],
              cache: dict[tuple[str, int], str]) -> None:
    """Run ``node`` in ``dtype``: cast float inputs (constants converted), cast float outputs back."""
    for i, name in enumerate(node.input):
        if not name or types.get(name) != TensorProto.FLOAT:
            continue
        const = ed.constant_value(name)
        node.input[i] = (_low_initializer(ed, name, dtype, cache) if const is not None
                         else _cast(ed, name, dtype, cache))
    for i, name in enumerate(node.output):
        if types.get(name) != TensorProto.FLOAT:
            continue
        low = ed.unique(f"{name}_{'fp16' if dtype == TensorProto.FLOAT16 else 'bf16'}")
        node.output[i] = low
        ed.add_node("Cast", [low], [name], name=f"{name}_Cast_fp32", to=TensorProto.FLOAT)
        types[low] = dtype


def _cast_to(node: onnx.NodeProto) -> int:
    return int(next(a.i for a in node.attribute if a.name == "to"))


def remove_cast_pairs(ed: GraphEditor, types: dict[str, int]) -> None:
    """Cast(to=t)(Cast(to=fp32)(x)) with x of type t  ->  x   (exact for t in fp16, bf16)."""
    producers = {out: node for node in ed.graph.node for out in node.output}
    outputs = {o.name for o in ed.graph.output}
    replace: dict[str, str] = {}
    for node in ed.graph.node:
        inner = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if inner is None or inner.op_type != "Cast" or node.output[0] in outputs:
            continue
        to = _cast_to(node)
        if to in _DTYPES.values() and _cast_to(inner) == TensorProto.FLOAT and types.get(inner.input[0]) == to:
            replace[node.output[0]] = inner.input[0]
    for node in ed.graph.node:
        for i, name in enumerate(node.input):
            if name in replace:
                node.input[i] = replace[name]
    used = {t for n in ed.graph.node for t in n.input} | outputs
    for node in [n for n in ed.graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]:
        ed.remove_node(node)


def convert_fp16(ed: GraphEditor) -> None:
    """Whole-graph FP16 (the FP16 baseline engine); graph inputs and outputs keep their FP32 type."""
    types = _elem_types(ed.model)
    for init in ed.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            converted = _to_low(numpy_helper.to_array(init), TensorProto.FLOAT16)
            converted.name = init.name
            init.CopyFrom(converted)
    for node in ed.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                converted = _to_low(numpy_helper.to_array(attr.t), TensorProto.FLOAT16)
                converted.name = attr.t.name
                attr.t.CopyFrom(converted)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    for graph_input in ed.graph.input:
        if types.get(graph_input.name) == TensorProto.FLOAT:
            readers = ed.consumers(graph_input.name)
            low = _cast(ed, graph_input.name, TensorProto.FLOAT16, {})
            for node in readers:
                GraphEditor.replace_input(node, graph_input.name, low)
    for graph_output in ed.graph.output:
        if types.get(graph_output.name) == TensorProto.FLOAT:
            low = ed.unique(f"{graph_output.name}_fp16")
            readers = ed.consumers(graph_output.name)
            ed.rename_output(graph_output.name, low)
            for node in readers:  # nodes inside the graph keep reading the FP16 value
                GraphEditor.replace_input(node, graph_output.name, low)
            ed.add_node("Cast", [low], [graph_output.name], name=f"{graph_output.name}_Cast_fp32",
                        to=TensorProto.FLOAT)
    del ed.graph.value_info[:]


def lower_fallback(ed: GraphEditor, plan: QuantPlan) -> dict[str, str]:
    """Cast islands for every fp16/bf16 node of the plan; returns node -> precision for the precision list."""
    targets = [n for n in plan.nodes if n.precision in _DTYPES]
    if not targets:
        return {}
    types = _elem_types(ed.model)
    cache: dict[tuple[str, int], str] = {}
    precision: dict[str, str] = {}
    for n in targets:
        cast_node(ed, ed.node(n.node), _DTYPES[n.precision], types, cache)
        precision[n.node] = n.precision.value
    remove_cast_pairs(ed, types)
    return precision
