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
from calib.onnx_file import read_graph

logger = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def load_model_for_build(model_path: Path) -> onnx.ModelProto:
    """Load the graph without its weights and check that every external-data file exists."""
    if not model_path.is_file():
        raise ConfigError(f"model {str(model_path)!r} does not exist")
    model = read_graph(model_path)
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


_INTEGER_CONSTANTS = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4,
                                onnx.TensorProto.UINT4})


def check_integer_constants(model: onnx.ModelProto) -> None:
    """ConfigError (exit 2) for an 8- or 4-bit integer initializer read by anything but a DequantizeLinear (or as a
    Q/DQ zero-point): TensorRT takes such a constant only as a quantized value into a DQ, and refuses the graph
    deep inside the build otherwise."""
    integers = {t.name for t in model.graph.initializer if t.data_type in _INTEGER_CONSTANTS}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            zero_point = node.op_type in QDQ_OPS and index == 2
            if name in integers and not (node.op_type == "DequantizeLinear" or zero_point):
                raise ConfigError(
                    f"initializer {name!r} holds {onnx.TensorProto.DataType.Name(_dtype(model, name))} values that "
                    f"{node.op_type} {node.name!r} reads directly (weight-only quantization as some exporters "
                    "write it); TensorRT takes such a constant only into a DequantizeLinear. Quantize the model "
                    "with build-engine (it folds these weights back to float and re-quantizes them) and build "
                    "that graph")


def _dtype(model: onnx.ModelProto, name: str) -> int:
    return next(int(t.data_type) for t in model.graph.initializer if t.name == name)


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


_POSITION_PATH_OPS = ("Slice", "Unsqueeze", "Squeeze", "Cast", "Expand", "Reshape", "Add", "Identity", "Flatten")


def _is_arange(values: np.ndarray) -> bool:
    flat = values.reshape(-1)
    return flat.size > 1 and bool(np.array_equal(flat, np.arange(flat.size, dtype=flat.dtype)))


def _indices_are_positions(model: onnx.ModelProto, tensor: str, constants: dict[str, onnx.TensorProto]) -> bool:
    """True when Gather indices come from a ``position_ids`` input, a Range, or a constant 0..n-1, through
    shape-only ops (the position lookups of BERT-, GPT-2- and decoder exports)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inputs = {v.name for v in model.graph.input}
    frontier, seen = [tensor], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in inputs and "position" in name:
            return True
        if name in constants:
            array = _array(constants[name])
            if array is not None and np.issubdtype(array.dtype, np.integer) and _is_arange(array):
                return True
            continue
        node = producers.get(name)
        if node is None:
            continue
        if node.op_type == "Range":
            return True
        if node.op_type in _POSITION_PATH_OPS:
            frontier.extend(i for i in node.input if i)
    return False


def _index_offset(model: onnx.ModelProto, tensor: str, constants: dict[str, onnx.TensorProto]) -> int:
    """How far the looked-up row is ahead of the sequence position: positions counted by a CumSum of the mask
    start at 1, plus any scalar constant added on the way (RoBERTa: padding_idx + 1 = 2); 0 when there is none."""
    producers = {o: n for n in model.graph.node for o in n.output}
    frontier, seen, counted, added = [tensor], set(), False, 0
    while frontier:
        node = producers.get(frontier.pop())
        if node is None or node.name in seen or node.op_type not in (*_POSITION_PATH_OPS, "Mul", "CumSum"):
            continue
        seen.add(node.name)
        counted |= node.op_type == "CumSum"
        if node.op_type == "Add":
            for name in node.input:
                array = _array(constants[name]) if name in constants else None
                if array is not None and array.size == 1 and np.issubdtype(array.dtype, np.integer):
                    added = max(added, int(array.reshape(-1)[0]))
        frontier.extend(i for i in node.input if i and i not in constants)
    return int(counted) + added


def position_table_rows(model: onnx.ModelProto) -> tuple[str, int] | None:
    """(Gather node, positions) of the model's position-embedding table, when the graph shows one.

    A table is a 2-D float initializer read by a Gather on axis 0 whose name says "position" or whose
    indices are positions (:func:`_indices_are_positions`); with several, the smallest bounds the sequence.
    Its rows bound the sequence length, less a constant the graph adds to the positions (RoBERTa's offset).
    """
    constants = _constants(model)
    found: list[tuple[int, str]] = []
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[0] not in constants:
            continue
        table = constants[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if len(table.dims) != 2 or axis != 0 or table.data_type not in (onnx.TensorProto.FLOAT,
                                                                         onnx.TensorProto.FLOAT16,
                                                                         onnx.TensorProto.BFLOAT16):
            continue
        named = "position" in node.input[0].lower() and "type" not in node.input[0].lower()
        if named or _indices_are_positions(model, node.input[1], constants):
            usable = int(table.dims[0]) - _index_offset(model, node.input[1], constants)
            found.append((usable, node.name or node.output[0]))
    if not found:
        return None
    rows, name = min(found)
    return name, rows


def check_position_range(model: onnx.ModelProto, longest: int, what: str) -> None:
    """ConfigError (exit 2) when ``longest`` positions exceed the model's position table, if it has one."""
    table = position_table_rows(model)
    if table is None or longest <= table[1]:
        return
    name, rows = table
    raise ConfigError(
        f"{what} reaches {longest} positions, but the model has {rows} position embeddings (Gather {name!r} reads "
        f"a table of {rows} rows); an engine with this profile could not run its maximum: keep it <= {rows}"
    )
