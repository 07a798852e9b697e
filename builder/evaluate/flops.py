"""Evaluation stage: the share of GEMM FLOPs that run in INT8, read off the evaluated graph itself.

A MatMul (or Gemm) counts as INT8 when both of its inputs come from DequantizeLinear, possibly through
layout-only ops (TensorRT moves Q/DQ across those), since that is the pattern TensorRT fuses into an INT8
GEMM. FLOPs use the shapes of one real batch run through ONNX Runtime, so attention's batched MatMuls are
weighted at that batch's sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from builder.evaluate.runner import Feeds, OrtRunner

GEMM_OPS = frozenset({"MatMul", "Gemm"})
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})


@dataclass(frozen=True, kw_only=True)
class GemmCost:
    """One GEMM node: its multiply-accumulate count on the probe batch and whether it runs in INT8."""

    node: str
    macs: int
    int8: bool


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output if out}


def _from_dequantize(tensor: str, producers: dict[str, onnx.NodeProto]) -> bool:
    node = producers.get(tensor)
    for _ in range(16):  # layout chains are short; the cap guards against malformed cycles
        if node is None:
            return False
        if node.op_type == "DequantizeLinear":
            return True
        if node.op_type not in LAYOUT_OPS:
            return False
        node = producers.get(node.input[0])
    return False


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {init.name: tuple(int(d) for d in init.dims) for init in model.graph.initializer}


def gemm_costs(model: onnx.ModelProto, feed: Feeds) -> tuple[GemmCost, ...]:
    """Every MatMul/Gemm with its MAC count on ``feed`` and whether both inputs are dequantized INT8."""
    gemms = [n for n in model.graph.node if n.op_type in GEMM_OPS]
    static = _static_shapes(model)
    dynamic = sorted({t for n in gemms for t in n.input[:2] if t not in static})
    runner = OrtRunner(model, extra_outputs=dynamic)
    values = runner.run(feed, dynamic) if dynamic else []
    shapes = dict(static)
    shapes.update({name: tuple(int(d) for d in v.shape) for name, v in zip(dynamic, values, strict=True)})
    producers = _producers(model)
    costs = []
    for node in gemms:
        a, b = shapes[node.input[0]], shapes[node.input[1]]
        if node.op_type == "Gemm":
            trans_a = any(at.name == "transA" and at.i == 1 for at in node.attribute)
            trans_b = any(at.name == "transB" and at.i == 1 for at in node.attribute)
            rows, inner = (a[1], a[0]) if trans_a else (a[0], a[1])
            cols = b[0] if trans_b else b[1]
            macs = rows * inner * cols
        else:
            inner = a[-1]
            batch = math.prod(a[:-2]) if len(a) > 2 else 1
            batch = max(batch, math.prod(b[:-2]) if len(b) > 2 else 1)
            rows = a[-2] if len(a) > 1 else 1
            macs = batch * rows * inner * b[-1]
        int8 = all(_from_dequantize(t, producers) for t in node.input[:2])
        costs.append(GemmCost(node=node.name, macs=int(macs), int8=int8))
    return tuple(costs)


def int8_gemm_share(costs: Sequence[GemmCost]) -> float | None:
    """INT8 MACs over all GEMM MACs; ``None`` for a graph without GEMMs."""
    total = sum(c.macs for c in costs)
    if total == 0:
        return None
    return sum(c.macs for c in costs if c.int8) / total
