"""Planning stage: GEMM FLOP counts per node, for the share of GEMM work that runs in INT8.

Counts are 2 x multiply-adds for one sequence of ``seq_len`` tokens (batch 1):

    weight GEMM   X[L, K] . W[K, N]            2 * L * K * N
    Q . K^T       heads x [L, d] . [d, L]      2 * L * L * hidden
    P . V         heads x [L, L] . [L, d]      2 * L * L * hidden
"""

from __future__ import annotations

import onnx

from builder.graph.report import GraphReport, Role
from builder.recipes.model import ACT_GEMM_ROLES

GemmFlops = dict[str, float]


def _weight_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    return {init.name: tuple(int(d) for d in init.dims) for init in model.graph.initializer}


def _hidden_size(report: GraphReport, shapes: dict[str, tuple[int, ...]]) -> int:
    if report.hidden_size:
        return int(report.hidden_size)
    for role in (Role.Q_PROJ, Role.ATTN_OUT, Role.QKV):
        for a in report.by_role(role):
            if a.weight in shapes and a.weight_axis is not None:
                n = shapes[a.weight][a.weight_axis]
                return n // 3 if role == Role.QKV else n
    return 0


def gemm_flops(model: onnx.ModelProto, report: GraphReport, seq_len: int = 128) -> GemmFlops:
    """FLOPs of every GEMM-role node of ``report`` for one sequence of ``seq_len`` tokens."""
    shapes = _weight_shapes(model)
    hidden = _hidden_size(report, shapes)
    flops: GemmFlops = {}
    for a in report.assignments:
        if a.weight is not None and a.weight in shapes and len(shapes[a.weight]) == 2:
            k, n = shapes[a.weight]
            flops[a.node] = 2.0 * seq_len * k * n
        elif a.role in ACT_GEMM_ROLES:
            flops[a.node] = 2.0 * seq_len * seq_len * hidden
    return flops
