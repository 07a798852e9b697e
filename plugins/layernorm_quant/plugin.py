"""Plugin room, LayerNormQuantize: registration with TensorRT's Quickly Deployable Plugins (``tensorrt.plugin``).

Pipeline stage: engine build. :func:`register` (idempotent) declares ``build_engine::LayerNormQuantize``:
a shape/dtype descriptor (INT8 codes shaped like ``x``; float32 per-token scales [..., 1]; the normalized copy
in ``x``'s dtype) and an ahead-of-time implementation that hands TensorRT the PTX compiled by
:mod:`plugins.aot` with epsilon and the scale baked in (TensorRT does not serialize AOT plugin attributes).
Engines built this way run without Python in any TensorRT runtime >= 10.9.

This registration covers the three-input form (x, gamma, beta); the residual form registers the same way
with a fourth input once QDP optional inputs are confirmed (UNVERIFIED; see README.md). tensorrt and triton
are imported inside :func:`register` only.
"""

from __future__ import annotations

from typing import Any

from calib.errors import BackendUnavailable
from plugins.common import PLUGIN_NAMESPACE
from plugins.layernorm_quant.schema import OP_TYPE, LayerNormQuantizeAttrs

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
_registered = False


def _load() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise BackendUnavailable("the LayerNormQuantize plugin needs full TensorRT >= 10.9 (tensorrt.plugin)") from exc
    return trt, trtp


def register() -> str:
    """Register the plugin with TensorRT (once); return its ``namespace::name``."""
    global _registered
    if _registered:
        return PLUGIN_ID
    trt, trtp = _load()

    @trtp.register(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def _desc(x: Any, gamma: Any, beta: Any, epsilon: float, scale: float, per_token: int,
              has_residual: int, emit_normalized: int) -> Any:
        LayerNormQuantizeAttrs(epsilon=epsilon, scale=scale, per_token=bool(per_token),
                               has_residual=bool(has_residual), emit_normalized=bool(emit_normalized))
        outs = [trtp.from_shape_expr(x.shape_expr, dtype=trt.int8)]
        if per_token:
            tok = trtp.from_shape_expr(x.shape_expr, dtype=trt.float32)
            tok.shape_expr[x.ndim - 1] = 1
            outs.append(tok)
        if emit_normalized:
            outs.append(x.like())
        return tuple(outs)

    @trtp.aot_impl(PLUGIN_ID)  # type: ignore[untyped-decorator]
    def _aot(  # noqa: PLR0913 -- QDP passes every input and attribute by name
        x: Any, gamma: Any, beta: Any, epsilon: float, scale: float, per_token: int, has_residual: int,
        emit_normalized: int, outputs: Any, tactic: int,
    ) -> Any:
        from plugins.aot import compile_layernorm_quant
        from plugins.common import check_row_width

        hidden_expr = x.shape_expr[x.ndim - 1]
        hidden = check_row_width("LayerNormQuantize hidden size", int(hidden_expr.constant_value()))
        dtype = "float16" if x.dtype == trt.float16 else "float32"
        kernel = compile_layernorm_quant(dtype=dtype, hidden=hidden, epsilon=epsilon, scale=scale,
                                         per_token=bool(per_token), emit_normalized=bool(emit_normalized),
                                         arch=_current_arch())
        n_rows = x.shape_expr.numel() // hidden_expr
        params = trtp.KernelLaunchParams()
        params.grid_x = trtp.cdiv(n_rows, kernel.rows_per_program)
        params.block_x = kernel.threads_per_block
        params.shared_mem = kernel.shared_bytes
        extra = trtp.SymIntExprs(2)
        extra[0] = trtp.SymInt32(n_rows)
        extra[1] = trtp.SymInt32(hidden_expr)
        return kernel.name.encode(), kernel.ptx.encode(), params, extra

    _registered = True
    return PLUGIN_ID


def _current_arch() -> int:
    """Compute capability of the GPU the engine is built on, as 80, 86, 89 or 90."""
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailable("building plugin engines reads the GPU's compute capability through torch") from exc
    major, minor = torch.cuda.get_device_capability()
    return int(major) * 10 + int(minor)
