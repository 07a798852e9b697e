"""Weight stage: weight quantizers that read the quantized model's own inputs (GPFQ), layer after layer.

GPFQ (builder.quant.gpfq) needs, for every GEMM, the input X~ the *quantized* model feeds it (every upstream
weight and activation already quantized) paired with the float model's input X over the same tokens. X~ of a
GEMM depends only on the GEMMs upstream of it, so the GEMMs are grouped by depth: a GEMM's stage is the number
of such GEMMs on the longest path above it (for a transformer block: Q/K/V, then the attention output, then
FC1, then FC2; as builder.weights.bias_correction groups its stages). For each stage in order:

    lower(model, plan, WeightSet: earlier stages final, the rest a placeholder)  ->  X~ at each GEMM's input
    FP32 model                                                                    ->  X  at the same input
    for each calibration batch: fold the paired non-padding rows into one GpfqObserver per GEMM input
    (H~ = X~^T X~ and G = X~^T X, two K x K exact sums; the batch's activations are dropped)
    X~ is the GEMM's input as the quantized model computes it, taken before the GEMM's own input quantizer
    (plus the offset of a centered input: builder.quant.centered quantizes x - c and folds c * colsum(W) into
    the bias); X is mapped to the weight view's inputs (builder.weights.inputs)
    quantize the stage's weights from those statistics

X~ stops at the GEMM's own input quantizer because that error is the GEMM's, not its inputs': where the input
range clips (an MSE range on FC2's input), G_tt / H~_tt > 1 would have the weights try to restore the clipped
mass and grow past what their grid holds. On MiniLM W4A8 (int8-gemm inputs) this takes GPFQ's mean cosine
from 0.846 to 0.917 (RTN 0.896; ``python -m bench.weights``).

Both models are truncated to what the stage's tensors need. Placeholders (RTN codes of the same shape) only
feed GEMMs of the same or later stages, whose own X~ is measured after they are final. One lowering and two
truncated passes per stage; memory: one batch of activations plus two K x K sums per GEMM input of a stage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from builder.graph.subgraph import truncated
from builder.plan.artifact import QuantPlan, WeightEdge
from builder.quant.base import QuantizedWeight, WeightContext
from builder.quant.gpfq import PAIRS_KIND
from builder.quant.registry import weight_quantizer
from builder.weights.inputs import InputMap
from builder.weights.weightset import WeightSet, view_key
from calib.errors import BuildError, CalibrationError
from calib.statistics import TensorStatistics
from calib.weights import GpfqObserver

logger = logging.getLogger(__name__)

Feed = Mapping[str, npt.NDArray[Any]]
F32 = npt.NDArray[np.float32]
THREADS = 2


@dataclass(frozen=True)
class StagedView:
    """One weight view quantized in stages: its GEMM, view name, float weight and input map."""

    edge: WeightEdge
    view: str
    weight: F32
    mapping: InputMap
    offset: float = 0.0  # a centered input's offset: the GEMM multiplies its input + offset (folded into the bias)


def depths(model: onnx.ModelProto, nodes: set[str]) -> dict[str, int]:
    """Stage of each GEMM in ``nodes``: how many of ``nodes`` lie on the longest path above it (graph order)."""
    level: dict[str, int] = {}
    out: dict[str, int] = {}
    for node in model.graph.node:  # ONNX graphs are topologically sorted (the checker enforces it)
        depth = max((level.get(t, 0) for t in node.input), default=0)
        if node.name in nodes:
            out[node.name] = depth
            depth += 1
        for name in node.output:
            level[name] = depth
    absent = sorted(nodes - set(out))
    if absent:
        raise BuildError(f"GEMMs {absent[:3]} of the plan are not nodes of the model")
    return out


def _truncated_session(model: onnx.ModelProto, tensors: Sequence[str]) -> Any:
    """An ONNX Runtime session of the part of ``model`` that computes ``tensors`` (its outputs)."""
    import onnxruntime as ort

    out = truncated(model, tensors)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # INT4 DQ+MatMul stays FP32
    return ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _rows(value: npt.NDArray[Any], mask: npt.NDArray[np.bool_] | None) -> F32:
    """The non-padding rows [tokens, K] of a GEMM input ([B, S, K], or [B*S, K] behind a reshape)."""
    x = np.asarray(value, dtype=np.float32)
    k = x.shape[-1]
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        return np.ascontiguousarray(x[mask])
    if mask is not None and x.ndim == 2 and x.shape[0] == mask.size:
        return np.ascontiguousarray(x[mask.reshape(-1)])
    return np.ascontiguousarray(x.reshape(-1, k))


Key = tuple[str, str, str]  # (X~ tensor in the lowered graph, weight view, X tensor in the float model)


def _keys(lowered: onnx.ModelProto, model: onnx.ModelProto, group: list[StagedView]) -> dict[int, Key]:
    """Per view of ``group`` (by id) its key. X~ of GEMM ``edge.node`` is its input in the lowered graph as the
    quantized model computes it, before the GEMM's own input quantizer (the input of its QuantizeLinear ->
    DequantizeLinear pair, when it has one)."""
    originals = {n.name: n for n in model.graph.node}
    gemms = {n.name: n for n in lowered.graph.node}
    producers = {out: n for n in lowered.graph.node for out in n.output}
    keys = {}
    for v in group:
        node = gemms.get(v.edge.node)
        if node is None:
            raise BuildError(f"GEMM {v.edge.node!r} is not in the lowered graph (its input quantizer splits it); gpfq "
                             "needs the GEMM itself")
        name = str(node.input[list(originals[v.edge.node].input).index(v.edge.input)])
        dequantize = producers.get(name)
        if dequantize is not None and dequantize.op_type == "DequantizeLinear":
            quantize = producers.get(dequantize.input[0])
            if quantize is not None and quantize.op_type == "QuantizeLinear":
                name = str(quantize.input[0])
        keys[id(v)] = (name, v.view, v.edge.input)
    return keys


def _collect(model: onnx.ModelProto, lowered: onnx.ModelProto, group: list[StagedView], keys: dict[int, Key],
             feeds: Sequence[Feed], mask_input: str) -> dict[Key, GpfqObserver]:
    """One GpfqObserver per key (:func:`_keys`) of ``group`` over ``feeds``."""
    quant_names = sorted({k[0] for k in keys.values()})
    float_names = sorted({k[2] for k in keys.values()})
    quant_session, float_session = _truncated_session(lowered, quant_names), _truncated_session(model, float_names)
    maps = {keys[id(v)]: v.mapping for v in group}
    offsets = {keys[id(v)]: v.offset for v in group}
    observers: dict[Key, GpfqObserver] = {}
    for feed in feeds:
        mask = feed.get(mask_input)
        mask_b = None if mask is None else np.asarray(mask) != 0
        q_in = {i.name for i in quant_session.get_inputs()}
        f_in = {i.name for i in float_session.get_inputs()}
        quant = dict(zip(quant_names, quant_session.run(quant_names, {k: v for k, v in feed.items() if k in q_in}),
                         strict=True))
        flt = dict(zip(float_names, float_session.run(float_names, {k: v for k, v in feed.items() if k in f_in}),
                       strict=True))
        for key, mapping in maps.items():
            xq, xf = _rows(quant[key[0]], mask_b), mapping.rows(_rows(flt[key[2]], mask_b))
            if offsets[key]:
                xq = (xq + np.float32(offsets[key])).astype(np.float32)
            observers.setdefault(key, GpfqObserver(xq.shape[1])).update(xq, xf)
    absent = sorted({k[2] for k in maps} - {k[2] for k in observers})
    if absent:
        raise CalibrationError(f"the calibration feeds gave no token rows for GEMM inputs {absent[:3]}")
    return observers


def quantize_in_stages(model: onnx.ModelProto, plan: QuantPlan, entries: dict[str, QuantizedWeight],
                       staged: list[StagedView], feeds: Sequence[Feed], *,
                       mask_input: str) -> dict[str, QuantizedWeight]:
    """``entries`` with every view of ``staged`` quantized from the partially quantized model's inputs.

    ``entries`` must already hold a placeholder of the right layout for every staged view (lowering needs one).
    """
    from builder.lower.pipeline import lower

    if not feeds:
        raise CalibrationError("weight quantizers that read the quantized model's inputs (gpfq) need calibration "
                               "feeds; got none")
    stage_of = depths(model, {v.edge.node for v in staged})
    out = dict(entries)
    stages = sorted(set(stage_of.values()))
    for number, stage in enumerate(stages, 1):
        group = [v for v in staged if stage_of[v.edge.node] == stage]
        lowered = lower(model, plan, WeightSet(entries=out), "portable").model
        keys = _keys(lowered, model, group)
        observers = _collect(model, lowered, group, keys, feeds, mask_input)
        for v in group:
            key = keys[id(v)]
            stats = TensorStatistics(tensor=f"{v.edge.input}#{v.view}" if v.view else v.edge.input,
                                     observers={PAIRS_KIND: observers[key]})
            ctx = WeightContext(node=v.edge.node, input_statistics=stats)
            quantizer = weight_quantizer(v.edge.quantizer)
            out[view_key(v.edge.node, v.view)] = quantizer.quantize(v.weight, v.edge.axis, v.edge.config, ctx)
        logger.info("staged weights: stage %d of %d, %d GEMMs", number, len(stages), len(group))
    return out
