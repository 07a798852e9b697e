"""Quantizer (planning and lowering stages): Bondarenko per-embedding-group (PEG) quantization.

Bondarenko, Nagel, Blankevoort 2021 (arXiv 2109.12948, section 4): the d features of a GEMM input are
permuted by ascending range r_j = max_j - min_j (a stable sort, so deterministic) and split into K equal
groups; every outlier dimension lands in the last group and each group gets its own per-tensor scale.
For a consumer Y = X.W on per-tensor INT8 hardware:

    Y = sum_k X[:, G_k] . W[G_k, :]

    X --Gather(G_0)--> Q/DQ(s_0) --MatMul(W[G_0,:])--\\
    X --Gather(G_1)--> Q/DQ(s_1) --MatMul(W[G_1,:])---Sum--> Y
    ...                                               /

Each partial product is an INT8 GEMM with per-channel weights (the WeightSet quantizes every row slice
W[G_k, :] as its own view). The groups are formed with Gather rather than by folding the permutation into
the producers, so the residual stream is untouched; the Gathers and Q/DQs are shared by every consumer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from builder.quant.base import ActivationQuantizer, EdgeContext, Placement
from calib.errors import BuildError, CalibrationError, ConfigError
from calib.quant import fake_quantize, scale_from_amax
from calib.schema import Schema

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from builder.lower.context import LoweringContext
    from builder.plan.artifact import ActivationEdge
    from builder.quant.base import F32


class PegConfig(Schema, frozen=True, kw_only=True):
    groups: int = 6  # K; a width that K does not divide gets the largest K' < K that divides it (plan says which)

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ConfigError(f"groups {self.groups} must be at least 1")


class PegGroup(Schema, frozen=True, kw_only=True):
    """One embedding group: its feature indices (ascending) and their shared symmetric range."""

    dims: tuple[int, ...]
    amax: float


class PegParams(Schema, frozen=True, kw_only=True):
    groups: tuple[PegGroup, ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ConfigError("PEG parameters need at least one group")


def peg_groups(tensor: str, dim_min: Sequence[float], dim_max: Sequence[float], k: int) -> tuple[PegGroup, ...]:
    """Range-sorted permutation split into K equal groups, each with the largest |value| of its dimensions.

        r_j = max_j - min_j;  pi = argsort(r) (stable, ascending);  group g = pi[g*d/K : (g+1)*d/K]
    """
    lo = np.asarray(dim_min, dtype=np.float64)
    hi = np.asarray(dim_max, dtype=np.float64)
    d = lo.size
    if d % k != 0:
        raise ConfigError(f"tensor {tensor!r}: PEG needs the width {d} to be a multiple of groups={k}")
    order = np.argsort(hi - lo, kind="stable")
    size = d // k
    groups = []
    for g in range(k):
        dims = np.sort(order[g * size:(g + 1) * size])
        amax = float(np.max(np.maximum(np.abs(lo[dims]), np.abs(hi[dims]))))
        groups.append(PegGroup(dims=tuple(int(i) for i in dims), amax=max(amax, 1e-8)))
    return tuple(groups)


class PegQuantizer(ActivationQuantizer[PegConfig, PegParams]):
    name = "peg"
    config_type = PegConfig
    params_type = PegParams
    placements = frozenset({Placement.WEIGHT_INPUT})
    observers = ("minmax", "dims")
    lowering_pass = "split"

    def decide(self, edge: EdgeContext, config: PegConfig) -> PegParams:
        dims = edge.statistics.dims
        if dims is None or dims.dim_min is None or dims.dim_max is None:
            raise CalibrationError(f"tensor {edge.tensor!r}: PEG needs per-dimension ranges, but its last axis is "
                                   "not a feature axis")
        width = int(dims.dim_min.size)
        k = max(g for g in range(1, min(config.groups, width) + 1) if width % g == 0)
        if k != config.groups:
            logger.warning("tensor %r: PEG groups=%d does not divide its width %d; using %d groups", edge.tensor,
                           config.groups, width, k)
        return PegParams(groups=peg_groups(edge.tensor, tuple(dims.dim_min), tuple(dims.dim_max), k))

    def describe(self, config: PegConfig, params: PegParams) -> str:
        return f"peg:K={len(params.groups)}"

    def weight_views(self, params: PegParams, weight: F32, axis: int) -> dict[str, F32]:
        rows = 1 - axis
        return {f"peg{k}": np.take(weight, np.asarray(g.dims, dtype=np.int64), axis=rows)
                for k, g in enumerate(params.groups)}

    def lower(self, ctx: LoweringContext, edge: ActivationEdge) -> None:
        inputs = _group_inputs(ctx, edge)
        for name in edge.consumers:
            _split_consumer(ctx, edge, name, inputs)

    def reference(self, x: F32, params: PegParams) -> F32:
        out = np.empty_like(x, dtype=np.float32)
        for g in params.groups:
            dims = np.asarray(g.dims, dtype=np.int64)
            out[..., dims] = fake_quantize(x[..., dims], scale_from_amax(g.amax))
        return out


def _group_inputs(ctx: LoweringContext, edge: ActivationEdge) -> list[str]:
    ed, outs = ctx.ed, []
    for k, group in enumerate(edge.params.groups):
        idx = ed.add_initializer(f"{edge.tensor}_peg{k}_dims", np.asarray(group.dims, dtype=np.int64))
        gathered = ed.unique(f"{edge.tensor}_peg{k}")
        ed.add_node("Gather", [edge.tensor, idx], [gathered], name=f"{edge.tensor}_peg{k}_Gather", axis=-1)
        outs.append(_qdq_fresh(ctx, gathered, group.amax))
    return outs


def _qdq_fresh(ctx: LoweringContext, tensor: str, amax: float) -> str:
    """Q -> DQ on a fresh tensor whose readers are created afterwards."""
    ed = ctx.ed
    scale = ed.add_initializer(f"{tensor}_scale", np.array(scale_from_amax(amax), dtype=np.float32))
    zero = ed.add_initializer(f"{tensor}_zero_point", np.array(0, dtype=np.int8))
    quantized = ed.unique(f"{tensor}_quantized")
    dequantized = ed.unique(f"{tensor}_dequantized")
    ed.add_node("QuantizeLinear", [tensor, scale, zero], [quantized], name=f"{tensor}_QuantizeLinear")
    ed.add_node("DequantizeLinear", [quantized, scale, zero], [dequantized], name=f"{tensor}_DequantizeLinear")
    return dequantized


def _gemm_layout(node: onnx.NodeProto, name: str, tensor: str) -> tuple[int, int]:
    """(row axis of the weight that the input features index, output-channel axis) for MatMul or Gemm."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul" and len(node.input) == 2 and node.input[0] == tensor:
        return 0, 1
    if (node.op_type == "Gemm" and node.input[0] == tensor and not attrs.get("transA", 0)
            and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
        return (1, 0) if attrs.get("transB", 0) else (0, 1)
    raise BuildError(f"PEG needs MatMul({tensor}, W) or Gemm({tensor}, W[, C]) consumers (no transA, alpha = beta "
                     f"= 1); {name!r} is {node.op_type}")


def _split_consumer(ctx: LoweringContext, edge: ActivationEdge, name: str, inputs: list[str]) -> None:
    ed = ctx.ed
    node = ed.node(name)
    row_axis, out_axis = _gemm_layout(node, name, edge.tensor)
    weight = node.input[1]
    w = ed.initializer(weight)
    if w is None or w.ndim != 2:
        raise BuildError(f"PEG consumer {name!r} has no 2-D weight initializer")
    partials = []
    for k, x_k in enumerate(inputs):
        w_name = ctx.weight_tensor(name, weight, out_axis, f"peg{k}", edge)
        out = ed.unique(f"{node.output[0]}_peg{k}")
        if node.op_type == "Gemm":
            ed.add_node("Gemm", [x_k, w_name], [out], name=f"{name}_peg{k}", transB=row_axis)
        else:
            ed.add_node("MatMul", [x_k, w_name], [out], name=f"{name}_peg{k}")
        partials.append(out)
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    total = ed.unique(f"{node.output[0]}_peg_sum") if bias else node.output[0]
    ed.add_node("Sum", partials, [total], name=f"{name}_peg_sum")
    if bias:
        ed.add_node("Add", [total, bias], [node.output[0]], name=f"{name}_peg_bias")
    ed.remove_node(node)
    ctx.rewritten.add(name)
