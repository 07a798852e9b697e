"""Plugin room, SoftmaxQuantize: registration with TensorRT's Quickly Deployable Plugins (``tensorrt.plugin``).

Pipeline stage: engine build. :func:`register` (idempotent) declares one plugin per I/O form, each
``<namespace>::SoftmaxQuantize`` with the namespace of :data:`FORMS`: ``build_engine`` (input ``x``) and
``build_engine_masked`` (``x`` and an additive ``mask`` that broadcasts to it); the output is INT8 codes
shaped like ``x``. The ahead-of-time implementation hands TensorRT the PTX compiled by :mod:`plugins.aot` with
the scale baked in. A dynamic row width (every dynamic-sequence profile has one) is compiled for the profile
maximum and the real width is passed at run time; the mask is addressed with strides computed from its
symbolic shape (0 along its broadcast dimensions).

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` validates the registered functions'
annotations with ``inspect.signature``. tensorrt and triton are imported inside functions only.
"""

import logging
from typing import Any

from calib.errors import BackendUnavailable, GraphError
from plugins.common import (
    PLUGIN_NAMESPACE,
    QdpFloat,
    QdpInt,
    check_aot_tensorrt,
    plugin_namespace,
    qdp_row_width,
    qdp_scalar,
)
from plugins.softmax_quant.schema import MAX_RANK, OP_TYPE, SoftmaxQuantizeAttrs

LOG = logging.getLogger(__name__)

# has_mask -> TensorRT plugin namespace of that form
FORMS: dict[bool, str] = {False: PLUGIN_NAMESPACE, True: plugin_namespace("masked")}


def namespace_for(attrs: SoftmaxQuantizeAttrs) -> str:
    """The namespace of the registered form a node with ``attrs`` needs."""
    return FORMS[attrs.has_mask]


def plugin_ids() -> tuple[str, ...]:
    """``namespace::name`` of every registered form."""
    return tuple(f"{ns}::{OP_TYPE}" for ns in FORMS.values())


def register() -> tuple[str, ...]:
    """Register every form with TensorRT (once per ``tensorrt.plugin`` module); return their ids."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise BackendUnavailable("the SoftmaxQuantize plugin needs full TensorRT >= 10.9 (tensorrt.plugin)") from exc
    check_aot_tensorrt(str(trt.__version__))
    for masked, namespace in FORMS.items():
        if hasattr(trtp.op, namespace) and hasattr(getattr(trtp.op, namespace), OP_TYPE):
            continue
        (_register_masked if masked else _register_plain)(f"{namespace}::{OP_TYPE}")
        LOG.debug("registered %s::%s", namespace, OP_TYPE)
    return plugin_ids()


F32 = QdpFloat
I32 = QdpInt


def _checked(scale: Any, has_mask: Any, form: bool) -> SoftmaxQuantizeAttrs:
    mask_flag = int(qdp_scalar("has_mask", has_mask))
    attrs = SoftmaxQuantizeAttrs(scale=qdp_scalar("scale", scale), has_mask=bool(mask_flag))
    if attrs.has_mask != form:
        raise GraphError(f"{OP_TYPE} attribute has_mask={mask_flag} does not match the registered form {FORMS[form]!r}")
    return attrs


def _codes(x: Any) -> Any:
    """INT8 codes shaped like ``x`` (a new shape container, never ``x``'s own)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if not 1 <= x.ndim <= MAX_RANK:
        raise GraphError(f"{OP_TYPE} takes rank 1..{MAX_RANK}, got {x.ndim}")
    return trtp.from_shape_expr(tuple(x.shape_expr), dtype=trt.int8)


def _is_one(dim: Any) -> bool:
    if isinstance(dim, int):
        return dim == 1
    return bool(dim.is_constant and dim.constant_value() == 1)


def mask_strides(mask_shape: Any) -> list[Any]:
    """Element strides (ms0, ms1, ms2, msn) of a contiguous mask along the [D0, D1, D2, N] view of ``x``.

    The mask aligns right (numpy broadcasting); a dimension that is the constant 1 broadcasts (stride 0), any
    other advances by the product of the mask dimensions after it. Works on ints and on symbolic shapes
    (``tensorrt.plugin.ShapeExpr``)::

        mask [B, 1, 1, S] for x [B, H, S, S]  ->  (S, 0, 0, 1)
    """
    dims = list(mask_shape)
    padded: list[Any] = [1] * (4 - len(dims)) + dims
    strides: list[Any] = [0, 0, 0, 0]
    step: Any = 1
    for axis in range(3, -1, -1):
        dim = padded[axis]
        if not _is_one(dim):
            strides[axis] = step
            # keep a symbolic operand on the left: ShapeExpr has __mul__ but no __rmul__
            step = dim * step if isinstance(step, int) else step * dim
    return strides


def _launch(x: Any, mask: Any, attrs: SoftmaxQuantizeAttrs) -> tuple[bytes, bytes, Any, Any]:
    """Kernel name, PTX, launch parameters and the int32 extras (n_rows, n_cols, d1, d2, mask strides)."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from plugins.aot import compile_softmax_quant, current_target

    if not 1 <= x.ndim <= MAX_RANK:
        raise GraphError(f"{OP_TYPE} takes rank 1..{MAX_RANK}, got {x.ndim}")
    width, exact = qdp_row_width(x)
    target = current_target()
    dtype = {trt.float16: "float16", trt.float32: "float32"}.get(x.dtype)
    if dtype is None:
        raise GraphError(f"{OP_TYPE} input dtype {x.dtype} is not supported; use float32 or float16")
    kernel = compile_softmax_quant(dtype=dtype, n_cols=width, scale=attrs.scale, has_mask=attrs.has_mask,
                                   arch=target.arch, ptx_isa=target.ptx_isa, exact_width=exact)
    dims = [x.shape_expr[i] for i in range(x.ndim)]
    n_cols = dims[-1]
    d1 = dims[-3] if x.ndim >= 3 else 1
    d2 = dims[-2] if x.ndim >= 2 else 1
    n_rows = x.shape_expr.numel() // n_cols
    strides = mask_strides([mask.shape_expr[i] for i in range(mask.ndim)]) if mask is not None else [0] * 4
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(n_rows, kernel.rows_per_program)
    params.block_x = kernel.threads_per_block
    params.shared_mem = kernel.shared_bytes
    values = [n_rows, n_cols, d1, d2, *strides]
    extra = trtp.SymIntExprs(len(values))
    for i, value in enumerate(values):
        extra[i] = trtp.SymInt32(value)
    return kernel.name.encode(), kernel.ptx.encode(), params, extra


# Signatures are what tensorrt.plugin validates: tensors first, every attribute typed (1-D NumPy arrays:
# plugins.common.qdp_scalar says why), a fixed-size Tuple return; the aot_impl repeats every attribute in
# registration order, then `outputs` and `tactic`.


def _register_plain(plugin_id: str) -> None:
    import tensorrt.plugin as trtp

    @trtp.register(plugin_id)  # type: ignore[untyped-decorator]
    def _desc(x: trtp.TensorDesc, scale: F32, has_mask: I32) -> tuple[trtp.TensorDesc]:
        _checked(scale, has_mask, False)
        return (_codes(x),)

    @trtp.aot_impl(plugin_id)  # type: ignore[untyped-decorator]
    def _aot(x: trtp.TensorDesc, scale: F32, has_mask: I32, outputs: tuple[trtp.TensorDesc], tactic: int,
             ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        return _launch(x, None, _checked(scale, has_mask, False))


def _register_masked(plugin_id: str) -> None:
    import tensorrt.plugin as trtp

    @trtp.register(plugin_id)  # type: ignore[untyped-decorator]
    def _desc(x: trtp.TensorDesc, mask: trtp.TensorDesc, scale: F32, has_mask: I32) -> tuple[trtp.TensorDesc]:
        _checked(scale, has_mask, True)
        if mask.ndim > x.ndim:
            raise GraphError(f"{OP_TYPE} mask rank {mask.ndim} exceeds the input rank {x.ndim}")
        return (_codes(x),)

    @trtp.aot_impl(plugin_id)  # type: ignore[untyped-decorator]
    def _aot(x: trtp.TensorDesc, mask: trtp.TensorDesc, scale: F32, has_mask: I32,
             outputs: tuple[trtp.TensorDesc], tactic: int,
             ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        return _launch(x, mask, _checked(scale, has_mask, True))
