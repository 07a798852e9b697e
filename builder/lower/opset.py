"""Lowering stage: raise the default-domain opset to 19 (21 for block-wise INT4 weights) before Q/DQ insertion.

Opset 19 is what TensorRT's Q/DQ import is checked against (TensorRT's ONNX parser, explicit quantization) and what the
``onnx.reference`` evaluator implements for QuantizeLinear/DequantizeLinear. Ops whose definition did not
change between the model's opset and 19 only need the version number raised; otherwise ONNX's version
converter rewrites the graph. Large initializers are held aside during the conversion (GEMM weights and
embeddings are never touched by the adapters, and copying them dominates the converter's run time).

Block-wise DequantizeLinear (``block_size``) and INT4 initializers exist from opset 21: a plan whose weight
quantizer stores block-wise INT4 weights (builder.quant.weight_common) lowers at 21 (:func:`required_opset`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import defs, helper, version_converter

from calib.errors import BuildError

if TYPE_CHECKING:
    from builder.plan.artifact import QuantPlan

TARGET_OPSET = 19
_ASIDE_ELEMENTS = 4096


def default_opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _unchanged_up_to(model: onnx.ModelProto, current: int, target: int) -> bool:
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            if defs.get_schema(node.op_type, target).since_version > current:
                return False
        except defs.SchemaError:
            return False
    return True


def upgrade_opset(model: onnx.ModelProto, target: int = TARGET_OPSET) -> onnx.ModelProto:
    """A copy of ``model`` at default-domain opset ``target`` (the model itself if it is already there)."""
    current = default_opset(model)
    if current >= target:
        return model
    if _unchanged_up_to(model, current, target):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        for o in out.opset_import:
            if o.domain in ("", "ai.onnx"):
                o.version = target
        return out
    light = onnx.ModelProto()
    light.CopyFrom(model)
    aside = [i for i in light.graph.initializer if int(np.prod(i.dims)) > _ASIDE_ELEMENTS]
    names = {i.name for i in aside}
    keep = [i for i in light.graph.initializer if i.name not in names]
    del light.graph.initializer[:]
    light.graph.initializer.extend(keep)
    light.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in aside)
    try:
        out = version_converter.convert_version(light, target)
    except Exception as exc:  # the converter raises plain RuntimeError/ValueError for unsupported adapters
        raise BuildError(f"cannot convert the model from opset {current} to {target}: {exc}") from exc
    inputs = [i for i in out.graph.input if i.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    out.graph.initializer.extend(aside)
    return out


def required_opset(plan: QuantPlan) -> int:
    """The opset the lowered graph of ``plan`` needs: 19, or higher where a weight quantizer's stored form needs
    it (its ``opset(config)``, e.g. 21 for block-wise INT4 weights)."""
    from builder.quant.registry import weight_quantizer

    needed = TARGET_OPSET
    for w in plan.weights:
        opset_of = getattr(weight_quantizer(w.quantizer), "opset", None)
        if opset_of is not None:
            needed = max(needed, int(opset_of(w.config)))
    return needed
