"""Plugin room: ONNX Runtime evaluation of plugin nodes through their NumPy references.

Pipeline stage: evaluation. A plugin-variant graph (nodes in our domain, see ``plugins.common``) runs on the
CPU: :func:`ort_evaluable_copy` moves every plugin node into ``ai.onnx.contrib`` (the only domain
onnxruntime-extensions serves Python ops in) under a per-signature op type, and :func:`register_reference_ops`
registers one Python op per signature (dtype x optional inputs x optional outputs), because an
onnxruntime-extensions op has a fixed list of inputs and outputs. The engine graph keeps our domain.

onnxruntime and onnxruntime-extensions are imported inside functions.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from calib.errors import BackendUnavailable, GraphError
from plugins.common import DOMAIN, FLOAT_DTYPES, ORT_CONTRIB_DOMAIN, check_float_dtype
from plugins.layernorm_quant import reference as ln_ref
from plugins.layernorm_quant.schema import OP_TYPE as LN_OP
from plugins.layernorm_quant.schema import LayerNormQuantizeAttrs
from plugins.softmax_quant import reference as sm_ref
from plugins.softmax_quant.schema import OP_TYPE as SM_OP
from plugins.softmax_quant.schema import SoftmaxQuantizeAttrs
from plugins.sparq_quant import ort_op as sparq_ort
from plugins.sparq_quant.schema import OP_TYPE as SPARQ_OP
from plugins.sparq_quant.schema import SparqQuantizeAttrs

LOG = logging.getLogger(__name__)

_DTYPE_TAGS = {"float32": "f32", "float16": "f16"}
_registered: set[str] = set()


def ln_variant_name(dtype: str, attrs: LayerNormQuantizeAttrs) -> str:
    """Op type of the ONNX Runtime op that evaluates a LayerNormQuantize node of this signature."""
    flags = f"r{int(attrs.has_residual)}t{int(attrs.per_token)}n{int(attrs.emit_normalized)}"
    return f"{LN_OP}_{_DTYPE_TAGS[dtype]}_{flags}"


def sm_variant_name(dtype: str, attrs: SoftmaxQuantizeAttrs) -> str:
    """Op type of the ONNX Runtime op that evaluates a SoftmaxQuantize node of this signature."""
    return f"{SM_OP}_{_DTYPE_TAGS[dtype]}_m{int(attrs.has_mask)}"


def _ln_body(per_token: bool, emit: bool) -> Callable[..., Any]:
    def body(*inputs: np.ndarray, **attrs: Any) -> Any:
        x, gamma, beta = inputs[0], inputs[1], inputs[2]
        residual = inputs[3] if len(inputs) > 3 else None
        q, token_scale, y = ln_ref.layernorm_quantize(
            x, gamma, beta, residual, epsilon=float(attrs["epsilon"]), scale=float(attrs["scale"]),
            per_token=per_token,
        )
        outputs: list[np.ndarray] = [q]
        if per_token:
            assert token_scale is not None
            outputs.append(token_scale)
        if emit:
            outputs.append(y.astype(x.dtype))
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    return body


def _sm_body(*inputs: np.ndarray, **attrs: Any) -> np.ndarray:
    mask = inputs[1] if len(inputs) > 1 else None
    return sm_ref.softmax_quantize(inputs[0], mask, scale=float(attrs["scale"]))


def register_reference_ops() -> None:
    """Register every plugin signature with onnxruntime-extensions (idempotent)."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as exc:
        raise BackendUnavailable(
            "evaluating plugin nodes needs onnxruntime-extensions; install `build-engine[plugins]`"
        ) from exc
    dt = {"float32": PyCustomOpDef.dt_float, "float16": PyCustomOpDef.dt_float16}
    s, f, i = PyCustomOpDef.dt_string, PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
    ln_attrs = {"epsilon": f, "scale": s, "per_token": i, "has_residual": i, "emit_normalized": i,
                "plugin_version": s, "plugin_namespace": s}
    sm_attrs = {"scale": s, "has_mask": i, "plugin_version": s, "plugin_namespace": s}
    for dtype, res, tok, emit in itertools.product(FLOAT_DTYPES.values(), (False, True), (False, True), (False, True)):
        attrs = LayerNormQuantizeAttrs(epsilon=1.0, per_token=tok, has_residual=res, emit_normalized=emit)
        name = ln_variant_name(dtype, attrs)
        if name in _registered:
            continue
        inputs = [dt[dtype]] * attrs.num_inputs
        outputs = [PyCustomOpDef.dt_int8] + [f] * int(tok) + [dt[dtype]] * int(emit)
        onnx_op(op_type=name, inputs=inputs, outputs=outputs, attrs=ln_attrs)(_ln_body(tok, emit))
        _registered.add(name)
    for dtype, has_mask in itertools.product(FLOAT_DTYPES.values(), (False, True)):
        name = sm_variant_name(dtype, SoftmaxQuantizeAttrs(has_mask=has_mask))
        if name in _registered:
            continue
        onnx_op(op_type=name, inputs=[dt[dtype]] * (1 + int(has_mask)), outputs=[PyCustomOpDef.dt_int8],
                attrs=sm_attrs)(_sm_body)
        _registered.add(name)
    sparq_ort.register(_registered)


def plugin_output_types(node: onnx.NodeProto, input_type: int) -> list[int]:
    """ONNX element types of a plugin node's outputs, given the element type of its first input."""
    if node.op_type == LN_OP:
        attrs = LayerNormQuantizeAttrs.from_onnx_attributes(node_attributes(node))
        return [onnx.TensorProto.INT8] + [onnx.TensorProto.FLOAT] * int(attrs.per_token) + [input_type] * int(
            attrs.emit_normalized
        )
    return [onnx.TensorProto.INT8]


def _elem_types(model: onnx.ModelProto, max_passes: int = 64) -> dict[str, int]:
    """Element types of every tensor; plugin outputs are typed by hand and inference re-run to a fixed point."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    for _ in range(max_passes):
        graph = onnx.shape_inference.infer_shapes(work).graph
        types = {init.name: init.data_type for init in graph.initializer}
        for vi in itertools.chain(graph.input, graph.value_info, graph.output):
            if vi.type.tensor_type.elem_type:
                types[vi.name] = vi.type.tensor_type.elem_type
        added = False
        for node in graph.node:
            if node.domain != DOMAIN or node.input[0] not in types:
                continue
            for name, elem in zip(node.output, plugin_output_types(node, types[node.input[0]]), strict=False):
                if name and name not in types:
                    work.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, None))
                    added = True
        if not added:
            return types
    raise GraphError(f"type inference over plugin nodes did not settle after {max_passes} passes")


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values (bytes decoded)."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def _exact_scale(node: onnx.NodeProto) -> None:
    """Carry the FLOAT ``scale`` as its decimal repr (STRING): onnxruntime-extensions hands a Python op its float
    attributes printed to 6 significant digits (0.019286619 arrives as 0.0192866), which moves INT8 codes whose
    x / scale lies near a rounding tie; a string arrives exactly, and float(repr) is the float32 value."""
    for attr in node.attribute:
        if attr.name == "scale" and attr.type == onnx.AttributeProto.FLOAT:
            attr.CopyFrom(onnx.helper.make_attribute("scale", repr(float(attr.f))))


def ort_evaluable_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy whose plugin nodes ONNX Runtime can run (with :func:`register_reference_ops` loaded)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    types = _elem_types(model)
    found = False
    for node in copy.graph.node:
        if node.domain != DOMAIN:
            continue
        attrs = node_attributes(node)
        dtype = check_float_dtype(f"{node.op_type} node {node.name!r} input {node.input[0]!r}",
                                  types.get(node.input[0], 0))
        if node.op_type == LN_OP:
            node.op_type = ln_variant_name(dtype, LayerNormQuantizeAttrs.from_onnx_attributes(attrs))
        elif node.op_type == SM_OP:
            node.op_type = sm_variant_name(dtype, SoftmaxQuantizeAttrs.from_onnx_attributes(attrs))
        elif node.op_type == SPARQ_OP:
            SparqQuantizeAttrs.from_onnx_attributes(attrs)
            node.op_type = sparq_ort.variant_name(dtype)
        else:
            raise GraphError(f"node {node.name!r}: unknown op type {node.op_type!r} in domain {DOMAIN!r}; "
                             f"known: {LN_OP}, {SM_OP}, {SPARQ_OP}")
        _exact_scale(node)
        node.domain = ORT_CONTRIB_DOMAIN
        found = True
    kept = [op for op in copy.opset_import if op.domain not in (DOMAIN, ORT_CONTRIB_DOMAIN)]
    del copy.opset_import[:]
    copy.opset_import.extend(kept)
    if found:
        copy.opset_import.append(onnx.helper.make_opsetid(ORT_CONTRIB_DOMAIN, 1))
    return copy


def make_session(model: onnx.ModelProto, *, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session for a model that may hold plugin nodes (evaluated by the references)."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    register_reference_ops()
    options = ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    evaluable = ort_evaluable_copy(model)
    return ort.InferenceSession(evaluable.SerializeToString(), options, providers=["CPUExecutionProvider"])
