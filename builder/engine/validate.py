"""Engine-build stage: checks on the graph before an engine build (cheap, and before anything is written).

- every external-data file the model references exists next to it;
- every QuantizeLinear/DequantizeLinear has a range: a build-time constant, finite, strictly positive scale,
  and (if given) a constant all-zero INT8 zero-point, as TensorRT's Q/DQ contract requires;
- a 1-D (per-channel) scale on an initializer matches the length of its axis.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from calib.errors import BuildError, ConfigError

logger = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def load_model_for_build(model_path: Path) -> onnx.ModelProto:
    """Load the graph without its weights and check that every external-data file exists."""
    if not model_path.is_file():
        raise ConfigError(f"model {str(model_path)!r} does not exist")
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others for a corrupt file
        raise BuildError(f"cannot read the ONNX model {str(model_path)!r}: {exc}") from exc
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None or not (model_path.parent / location).is_file():
            raise BuildError(
                f"initializer {tensor.name!r} of {str(model_path)!r} lives in the external-data file "
                f"{location!r}, which is missing from {str(model_path.parent)!r}"
            )
    return model


def external_data_files(model: onnx.ModelProto, model_path: Path) -> list[Path]:
    """The external-data files the model references (sorted, unique)."""
    names = {
        e.value
        for t in model.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for e in t.external_data
        if e.key == "location"
    }
    return [model_path.parent / n for n in sorted(names)]


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    found[node.output[0]] = attr.t
    return found


def _array(tensor: onnx.TensorProto) -> np.ndarray | None:
    """The values of a constant, or None when they live in external data (checked by the parser instead)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    return numpy_helper.to_array(tensor)


def check_qdq(model: onnx.ModelProto) -> int:
    """Check every Q/DQ node's scale and zero-point; returns how many Q/DQ nodes there are."""
    constants = _constants(model)
    count = 0
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS:
            continue
        count += 1
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        if len(node.input) < 2 or not node.input[1] or node.input[1] not in constants:
            raise BuildError(
                f"{label} has no range: its scale must be a constant initializer (calibrate the tensor "
                f"{node.input[0]!r} or leave it unquantized)"
            )
        scale = _array(constants[node.input[1]])
        if scale is not None and not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise BuildError(f"{label}: scale {node.input[1]!r} must be finite and strictly positive")
        if len(node.input) > 2 and node.input[2]:
            zp_tensor = constants.get(node.input[2])
            if zp_tensor is None:
                raise BuildError(f"{label}: zero-point {node.input[2]!r} must be a constant (all zeros)")
            zero_point = _array(zp_tensor)
            if zp_tensor.data_type != onnx.TensorProto.INT8 or (zero_point is not None and np.any(zero_point != 0)):
                raise BuildError(
                    f"{label}: zero-point {node.input[2]!r} must be INT8 zeros; TensorRT supports only symmetric "
                    "quantization"
                )
        _check_axis(node, constants, scale, label)
    return count


def _check_axis(
    node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], scale: np.ndarray | None, label: str
) -> None:
    if scale is None or scale.ndim != 1 or node.input[0] not in constants:
        return
    dims = list(constants[node.input[0]].dims)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    axis = axis + len(dims) if axis < 0 else axis
    if not 0 <= axis < len(dims) or dims[axis] != scale.shape[0]:
        raise BuildError(
            f"{label}: per-channel scale of length {scale.shape[0]} does not match axis {axis} of "
            f"{node.input[0]!r} with shape {dims}"
        )
