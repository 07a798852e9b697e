"""Plugin room, SparqQuantize: registration with TensorRT's Quickly Deployable Plugins (``tensorrt.plugin``).

Pipeline stage: engine build. :func:`register` (idempotent) declares ``build_engine::SparqQuantize``: one input
``x`` (float32 or float16, [..., K]), one INT8 output shaped like it, and an ahead-of-time implementation that
hands TensorRT the PTX of ``kernel.py`` compiled for the building GPU with the scale and the SPARQ options baked
in (TensorRT does not serialize AOT plugin attributes). The kernel takes the row count and K as int32 run-time
arguments, so dynamic batch and sequence axes (and even a dynamic K) need no recompilation. Engines built this
way run without Python in any TensorRT runtime >= 10.9.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` validates the registered functions with
``inspect.signature`` (no string evaluation): tensors first, annotated ``trtp.TensorDesc``; every attribute with
a real ``int``/``float`` type and no default; a fixed ``tuple[trtp.TensorDesc]`` return; the ``aot_impl``
repeats the attributes in registration order, then ``outputs`` and ``tactic``, and returns the 4-tuple
(kernel name, PTX, launch parameters, extra int32 arguments). tensorrt and triton are imported inside functions.
"""

import logging
from typing import Any

from calib.errors import BackendUnavailable, GraphError
from plugins.common import PLUGIN_NAMESPACE, check_aot_tensorrt, qdp_scalar
from plugins.common import QdpFloat as F32
from plugins.common import QdpInt as I32
from plugins.sparq_quant.schema import OP_TYPE, SparqQuantizeAttrs

LOG = logging.getLogger(__name__)

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"


def register() -> str:
    """Register the plugin with TensorRT (once per ``tensorrt.plugin`` module); return its ``namespace::name``."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise BackendUnavailable("the SparqQuantize plugin needs full TensorRT >= 10.9 (tensorrt.plugin)") from exc
    check_aot_tensorrt(str(trt.__version__))
    if not (hasattr(trtp.op, PLUGIN_NAMESPACE) and hasattr(getattr(trtp.op, PLUGIN_NAMESPACE), OP_TYPE)):
        _register(PLUGIN_ID)
        LOG.debug("registered %s", PLUGIN_ID)
    return PLUGIN_ID


def _attrs(scale: Any, window_bits: Any, placements: Any, round_nearest: Any, vsparq: Any) -> SparqQuantizeAttrs:
    """The attributes as tensorrt.plugin hands them over (1-element arrays, plugins.common.qdp_scalar), checked."""
    return SparqQuantizeAttrs(scale=qdp_scalar("scale", scale), window_bits=int(qdp_scalar("window_bits", window_bits)),
                              placements=int(qdp_scalar("placements", placements)),
                              round_nearest=bool(qdp_scalar("round_nearest", round_nearest)),
                              vsparq=bool(qdp_scalar("vsparq", vsparq)))


def _codes(x: Any) -> Any:
    """INT8 codes shaped like ``x`` (a new shape container, never ``x``'s own)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if x.ndim < 1:
        raise GraphError(f"{OP_TYPE} takes a tensor of rank >= 1 (pairs run along the last axis)")
    return trtp.from_shape_expr(tuple(x.shape_expr), dtype=trt.int8)


def _launch(x: Any, attrs: SparqQuantizeAttrs) -> tuple[bytes, bytes, Any, Any]:
    """Kernel name, PTX, launch parameters and the int32 extras (n_rows, n_cols)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from plugins.aot import current_target
    from plugins.sparq_quant.kernel import compile_sparq_quant

    dtype = {trt.float16: "float16", trt.float32: "float32"}.get(x.dtype)
    if dtype is None:
        raise GraphError(f"{OP_TYPE} input dtype {x.dtype} is not supported; use float32 or float16")
    target = current_target()
    kernel = compile_sparq_quant(dtype=dtype, scale=attrs.scale, config=attrs.config(), arch=target.arch,
                                 ptx_isa=target.ptx_isa)
    n_cols = x.shape_expr[x.ndim - 1]
    n_rows = x.shape_expr.numel() // n_cols
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(n_rows * ((n_cols + 1) // 2), kernel.rows_per_program)  # one lane per pair
    params.block_x = kernel.threads_per_block
    params.shared_mem = kernel.shared_bytes
    extra = trtp.SymIntExprs(2)
    extra[0] = trtp.SymInt32(n_rows)
    extra[1] = trtp.SymInt32(n_cols)
    return kernel.name.encode(), kernel.ptx.encode(), params, extra


def _register(plugin_id: str) -> None:
    import tensorrt.plugin as trtp

    # attributes annotated as 1-D NumPy arrays, not float/int: plugins.common.qdp_scalar says why
    @trtp.register(plugin_id)  # type: ignore[untyped-decorator]
    def _desc(x: trtp.TensorDesc, scale: F32, window_bits: I32, placements: I32, round_nearest: I32,
              vsparq: I32) -> tuple[trtp.TensorDesc]:
        _attrs(scale, window_bits, placements, round_nearest, vsparq)
        return (_codes(x),)

    @trtp.aot_impl(plugin_id)  # type: ignore[untyped-decorator]
    def _aot(
        x: trtp.TensorDesc, scale: F32, window_bits: I32, placements: I32, round_nearest: I32, vsparq: I32,
        outputs: tuple[trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        return _launch(x, _attrs(scale, window_bits, placements, round_nearest, vsparq))
