"""Weight stage (optional, needs calibration data): empirical bias correction of INT8 weight GEMMs.

Quantizing a GEMM's inputs and weights shifts the mean of its output (Nagel et al. 2019, "Data-Free
Quantization", section 4.2, the empirical variant; Banner et al. 2019). For every INT8 weight GEMM
whose output feeds an ``Add`` with a constant bias initializer (``MatMul -> Add(bias)``), this pass runs
the calibration feeds through the FP32 model and the lowered model, takes the per-output-channel mean of
``quantized GEMM+bias output - FP32 GEMM+bias output`` over the non-padding tokens and subtracts it from the
bias. Measuring after the bias ``Add`` keeps whatever an earlier pass folded into the bias (the offset of a
centered input, :mod:`builder.quant.centered`). The shifts become part of the WeightSet, which lowering
applies (the same float32 arithmetic as here).

Correction is sequential: the GEMMs are grouped into stages by how many corrected GEMMs lie upstream of
them (for a transformer block: Q/K/V, then the attention output, then FC1, then FC2), and a stage is
measured on the lowered model whose earlier stages are already corrected, so each correction also absorbs
the mean error its inputs carry. One FP32 pass plus one pass of the lowered model per stage.

Deterministic: sums are accumulated in float64 in feed order, and the same model, lowered model and feeds
give a byte-identical result.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from builder.graph.subgraph import truncated
from builder.lower.graph_edit import GraphEditor
from calib.errors import BuildError, CalibrationError

logger = logging.getLogger(__name__)

Feed = Mapping[str, npt.NDArray[Any]]
MASK_INPUT = "attention_mask"
DEFAULT_THREADS = 2


@dataclass(frozen=True, kw_only=True)
class BiasTarget:
    """One GEMM whose bias absorbs the mean output error."""

    node: str  # the INT8 weight GEMM (MatMul)
    output: str  # the bias Add's output, where the error is measured (the same name in the FP32 model)
    add: str  # the Add that adds the bias
    bias: str  # the bias initializer
    stage: int  # number of corrected GEMMs on the longest upstream path


def _int8_weight_gemm(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto],
                      inits: Mapping[str, onnx.TensorProto]) -> bool:
    """A MatMul whose second operand is DequantizeLinear of an INT8 initializer."""
    if node.op_type != "MatMul" or len(node.input) != 2:
        return False
    dq = producers.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear":
        return False
    weight = inits.get(dq.input[0])
    return weight is not None and weight.data_type == onnx.TensorProto.INT8


def find_targets(model: onnx.ModelProto, nodes: Collection[str] | None = None) -> list[BiasTarget]:
    """The INT8 weight GEMMs of the lowered ``model`` with a bias Add (only those in ``nodes`` when given),
    in graph order with their correction stage."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in dict.fromkeys(n.input):
            consumers.setdefault(t, []).append(n)
    editor = GraphEditor(model)  # read only: finds each GEMM's bias Add
    level: dict[str, int] = {}  # tensor -> corrected GEMMs on the longest path that produced it
    targets = []
    for n in graph.node:  # ONNX graphs are topologically sorted (the checker enforces it)
        depth = max((level.get(t, 0) for t in n.input), default=0)
        found = None
        if (nodes is None or n.name in nodes) and _int8_weight_gemm(n, producers, inits):
            found = editor.bias_add(n)
            if found is None and nodes is not None:
                logger.info("bias correction: GEMM %s has no constant bias Add; left as is", n.name)
        if found is not None:
            add, bias = found
            targets.append(BiasTarget(node=n.name, output=add.output[0], add=add.name, bias=bias, stage=depth))
            depth += 1
        for o in n.output:
            level[o] = depth
    if nodes is not None:
        missing = sorted(set(nodes) - {n.name for n in graph.node})
        if missing:
            logger.info("bias correction: %d planned GEMMs are not in the lowered graph (rewritten by another "
                        "pass): %s", len(missing), ", ".join(missing[:5]))
    shared = [b for b, c in _counts(t.bias for t in targets).items() if c > 1 or len(consumers.get(b, [])) > 1]
    if shared:
        raise BuildError(f"bias initializers shared by several nodes cannot be corrected one by one: {shared[:5]}")
    return targets


def _counts(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _session(model: onnx.ModelProto, tensors: Sequence[str], threads: int) -> Any:
    import onnxruntime as ort

    work = truncated(model, tensors)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(work.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _token_rows(value: npt.NDArray[Any], feed: Feed, mask_input: str) -> npt.NDArray[Any]:
    """GEMM output rows [tokens, N] of the non-padding tokens (every row when the feed has no mask)."""
    mask = feed.get(mask_input)
    rows: npt.NDArray[Any]
    if mask is not None and value.ndim == 3 and tuple(value.shape[:2]) == tuple(mask.shape):
        rows = value[np.asarray(mask) != 0]
    else:
        rows = value.reshape(-1, value.shape[-1])
    return rows


def channel_means(model: onnx.ModelProto, tensors: Sequence[str], feeds: Sequence[Feed], *,
                  mask_input: str = MASK_INPUT, threads: int = DEFAULT_THREADS) -> dict[str, npt.NDArray[np.float64]]:
    """Per-channel (last axis) mean of each tensor over the non-padding tokens of ``feeds`` (float64)."""
    session = _session(model, tensors, threads)
    inputs = {i.name for i in session.get_inputs()}
    sums: dict[str, npt.NDArray[np.float64]] = {}
    counts = dict.fromkeys(tensors, 0)
    for feed in feeds:
        values = session.run(list(tensors), {k: v for k, v in feed.items() if k in inputs})
        for name, value in zip(tensors, values, strict=True):
            rows = _token_rows(np.asarray(value), feed, mask_input)
            part = np.sum(rows.astype(np.float64), axis=0)
            sums[name] = part if name not in sums else sums[name] + part
            counts[name] += len(rows)
    if not tensors or min(counts.values()) == 0:
        raise CalibrationError("bias correction needs calibration feeds with at least one token; got none")
    return {name: sums[name] / counts[name] for name in tensors}


def set_bias(model: onnx.ModelProto, name: str, shift: npt.NDArray[np.float64]) -> float:
    """Replace bias initializer ``name`` by float32(bias - shift) in place; returns max|shift|."""
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == name:
            bias = numpy_helper.to_array(tensor).astype(np.float64)
            if bias.shape != shift.shape:
                raise BuildError(f"bias {name!r} has shape {bias.shape}, the GEMM output has {shift.shape[0]} "
                                 "channels")
            corrected = (bias - shift).astype(np.float32)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(corrected, name))
            return float(np.max(np.abs(shift)))
    raise BuildError(f"bias initializer {name!r} not found")


def correct_biases(fp32_model: onnx.ModelProto, lowered_model: onnx.ModelProto, feeds: Iterable[Feed], *,
                   nodes: Collection[str] | None = None, mask_input: str = MASK_INPUT,
                   threads: int = DEFAULT_THREADS) -> tuple[onnx.ModelProto, dict[str, npt.NDArray[np.float64]]]:
    """A copy of ``lowered_model`` whose GEMM biases absorb the mean output error on ``feeds``, and the
    per-channel shift subtracted from each corrected GEMM's bias (keyed by GEMM node).

    ``nodes`` limits the correction to these GEMM node names (None: every INT8 weight GEMM with a bias Add).
    Each GEMM's bias Add output must carry the same name in ``fp32_model``. ``feeds`` are the calibration
    batches (never evaluation data); ``mask_input`` names the padding mask that selects the tokens averaged.
    """
    batches = list(feeds)
    if not batches:
        raise CalibrationError("bias correction needs calibration feeds; got none")
    targets = find_targets(lowered_model, nodes)
    result = onnx.ModelProto()
    result.CopyFrom(lowered_model)
    shifts: dict[str, npt.NDArray[np.float64]] = {}
    if not targets:
        logger.info("bias correction: no INT8 weight GEMM with a bias Add; nothing to correct")
        return result, shifts
    fp32_tensors = {o for n in fp32_model.graph.node for o in n.output}
    absent = [t.output for t in targets if t.output not in fp32_tensors]
    if absent:
        raise BuildError(f"bias correction: GEMM bias outputs {absent[:5]} are not in the FP32 model; pass the model "
                         "the lowered graph was made from")
    reference = channel_means(fp32_model, [t.output for t in targets], batches, mask_input=mask_input,
                              threads=threads)
    stages = sorted({t.stage for t in targets})
    for stage in stages:
        group = [t for t in targets if t.stage == stage]
        measured = channel_means(result, [t.output for t in group], batches, mask_input=mask_input, threads=threads)
        for t in group:
            shifts[t.node] = measured[t.output] - reference[t.output]
            worst = set_bias(result, t.bias, shifts[t.node])
            logger.debug("bias correction stage %d: %s max |shift| %.3g", stage, t.node, worst)
    logger.info("bias correction: %d GEMM biases corrected in %d sequential stages on %d batches",
                len(targets), len(stages), len(batches))
    return result, shifts
