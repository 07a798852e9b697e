"""Plugin room, SoftmaxQuantize: registration with TensorRT's Quickly Deployable Plugins (``tensorrt.plugin``).

Pipeline stage: engine build. :func:`register` (idempotent) declares ``build_engine::SoftmaxQuantize``: INT8
codes shaped like ``x``, and an ahead-of-time implementation that hands TensorRT the PTX compiled by
:mod:`plugins.aot` with the scale baked in. This registration covers the one-input form; the masked form
registers the same way with a second input once QDP optional inputs are confirmed (UNVERIFIED; README.md).
tensorrt and triton are imported inside :func:`register` only.
"""

from __future__ import annotations

from typing import Any

from calib.errors import BackendUnavailable
from plugins.common import PLUGIN_NAMESPACE
from plugins.softmax_quant.schema import MAX_RANK, OP_TYPE, SoftmaxQuantizeAttrs

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
_registered = False


def register() -> str:
    """Register the plugin with TensorRT (once); return its ``namespace::name``."""
    global _registered
    if _registered:
        return PLUGIN_ID
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise BackendUnavailable("the SoftmaxQuantize plugin needs full TensorRT >= 10.9 (tensorrt.plugin)") from exc

    @trtp.register(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def _desc(x: Any, scale: float, has_mask: int) -> Any:
        SoftmaxQuantizeAttrs(scale=scale, has_mask=bool(has_mask))
        return trtp.from_shape_expr(x.shape_expr, dtype=trt.int8)

    @trtp.aot_impl(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def _aot(x: Any, scale: float, has_mask: int, outputs: Any, tactic: int) -> Any:
        from plugins.aot import compile_softmax_quant
        from plugins.common import check_row_width
        from plugins.layernorm_quant.plugin import _current_arch

        if not 1 <= x.ndim <= MAX_RANK:
            raise ValueError(f"{OP_TYPE} takes rank 1..{MAX_RANK}, got {x.ndim}")
        width_expr = x.shape_expr[x.ndim - 1]
        n_cols = check_row_width("SoftmaxQuantize row width", int(width_expr.constant_value()))
        dtype = "float16" if x.dtype == trt.float16 else "float32"
        kernel = compile_softmax_quant(dtype=dtype, n_cols=n_cols, scale=scale, arch=_current_arch())
        dims = [x.shape_expr[i] for i in range(x.ndim)]
        d1 = dims[-3] if x.ndim >= 3 else 1
        d2 = dims[-2] if x.ndim >= 2 else 1
        n_rows = x.shape_expr.numel() // width_expr
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(n_rows, kernel.rows_per_program)
        params.block_x = kernel.threads_per_block
        params.shared_mem = kernel.shared_bytes
        values = [n_rows, width_expr, d1, d2, 0, 0, 0, 0]  # no mask: all mask strides 0
        extra = trtp.SymIntExprs(len(values))
        for i, value in enumerate(values):
            extra[i] = trtp.SymInt32(value)
        return kernel.name.encode(), kernel.ptx.encode(), params, extra

    _registered = True
    return PLUGIN_ID
