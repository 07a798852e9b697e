"""Plugin room, LayerNormQuantize: registration with TensorRT's Quickly Deployable Plugins (``tensorrt.plugin``).

Pipeline stage: engine build. :func:`register` (idempotent) declares one plugin per I/O form the lowering
writes, each ``<namespace>::LayerNormQuantize`` with the namespace of :data:`FORMS`:

    form                          inputs                      outputs
    build_engine                  x, gamma, beta              y (int8)
    build_engine_residual         x, gamma, beta, residual    y
    build_engine_normalized       x, gamma, beta              y, normalized (x's dtype)
    build_engine_residual_normalized                          y, normalized

A registration fixes its input count and output count (the return annotation), so the forms cannot share
one. The per-token form (a float32 scale per row) is not registered: its consumer must be a plugin too, and
the lowering never writes it; :func:`namespace_for` refuses it before any parsing.

Each registration has only an ahead-of-time implementation: TensorRT gets the PTX compiled by
:mod:`plugins.aot` for the building GPU (epsilon and the scale baked in: TensorRT does not serialize AOT
attributes), so the engine runs without Python in any TensorRT runtime >= 10.9. With no JIT implementation
the ONNX node needs no ``aot`` attribute (see README.md, "Kernel and TensorRT").

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` reads the registered functions'
annotations with ``inspect.signature`` (unevaluated strings would fail its checks). tensorrt and triton are
imported inside functions only.
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
from plugins.layernorm_quant.schema import OP_TYPE, LayerNormQuantizeAttrs

LOG = logging.getLogger(__name__)

# (has_residual, emit_normalized) -> TensorRT plugin namespace of that form
FORMS: dict[tuple[bool, bool], str] = {
    (False, False): PLUGIN_NAMESPACE,
    (True, False): plugin_namespace("residual"),
    (False, True): plugin_namespace("normalized"),
    (True, True): plugin_namespace("residual", "normalized"),
}


def namespace_for(attrs: LayerNormQuantizeAttrs) -> str:
    """The namespace of the registered form a node with ``attrs`` needs; GraphError for the per-token form."""
    if attrs.per_token:
        raise GraphError(
            f"{OP_TYPE} with per_token=1 has no TensorRT registration: its per-row scales need a consuming "
            "plugin, which this project does not build; use a static scale (per_token=0)"
        )
    return FORMS[(attrs.has_residual, attrs.emit_normalized)]


def plugin_ids() -> tuple[str, ...]:
    """``namespace::name`` of every registered form."""
    return tuple(f"{ns}::{OP_TYPE}" for ns in FORMS.values())


def _load() -> tuple[Any, Any]:
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise BackendUnavailable("the LayerNormQuantize plugin needs full TensorRT >= 10.9 (tensorrt.plugin)") from exc
    return trt, trtp


def register() -> tuple[str, ...]:
    """Register every form with TensorRT (once per ``tensorrt.plugin`` module); return their ids."""
    trt, trtp = _load()
    check_aot_tensorrt(str(trt.__version__))
    for (residual, normalized), namespace in FORMS.items():
        if hasattr(trtp.op, namespace) and hasattr(getattr(trtp.op, namespace), OP_TYPE):
            continue
        registrar = _REGISTRARS[(residual, normalized)]
        registrar(f"{namespace}::{OP_TYPE}")
        LOG.debug("registered %s::%s", namespace, OP_TYPE)
    return plugin_ids()


F32 = QdpFloat
I32 = QdpInt


def _checked(epsilon: Any, scale: Any, per_token: Any, has_residual: Any, emit_normalized: Any,
             form: tuple[bool, bool]) -> LayerNormQuantizeAttrs:
    flags = [int(qdp_scalar(name, v)) for name, v in (("per_token", per_token), ("has_residual", has_residual),
                                                       ("emit_normalized", emit_normalized))]
    attrs = LayerNormQuantizeAttrs(epsilon=qdp_scalar("epsilon", epsilon), scale=qdp_scalar("scale", scale),
                                   per_token=bool(flags[0]), has_residual=bool(flags[1]),
                                   emit_normalized=bool(flags[2]))
    if attrs.per_token or (attrs.has_residual, attrs.emit_normalized) != form:
        raise GraphError(
            f"{OP_TYPE} attributes per_token={flags[0]}, has_residual={flags[1]}, emit_normalized={flags[2]} "
            f"do not match the registered form {FORMS[form]!r}"
        )
    return attrs


def _outputs(x: Any, attrs: LayerNormQuantizeAttrs) -> tuple[Any, ...]:
    """Output descriptors: INT8 codes shaped like ``x`` (a new shape container, never ``x``'s own), and the
    normalized copy (``x.like()``: same shape and dtype) when the form emits it."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    codes = trtp.from_shape_expr(tuple(x.shape_expr), dtype=trt.int8)
    return (codes, x.like()) if attrs.emit_normalized else (codes,)


def _launch(x: Any, attrs: LayerNormQuantizeAttrs) -> tuple[bytes, bytes, Any, Any]:
    """Kernel name, PTX, launch parameters and the int32 extras (n_rows, hidden) for input ``x``."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from plugins.aot import compile_layernorm_quant, current_target

    width, exact = qdp_row_width(x)
    target = current_target()
    dtype = {trt.float16: "float16", trt.float32: "float32"}.get(x.dtype)
    if dtype is None:
        raise GraphError(f"{OP_TYPE} input dtype {x.dtype} is not supported; use float32 or float16")
    kernel = compile_layernorm_quant(
        dtype=dtype, hidden=width, epsilon=attrs.epsilon, scale=attrs.scale, has_residual=attrs.has_residual,
        emit_normalized=attrs.emit_normalized, arch=target.arch, ptx_isa=target.ptx_isa, exact_width=exact,
    )
    hidden = x.shape_expr[x.ndim - 1]
    n_rows = x.shape_expr.numel() // hidden
    params = trtp.KernelLaunchParams()
    params.grid_x = trtp.cdiv(n_rows, kernel.rows_per_program)
    params.block_x = kernel.threads_per_block
    params.shared_mem = kernel.shared_bytes
    extra = trtp.SymIntExprs(2)
    extra[0] = trtp.SymInt32(n_rows)
    extra[1] = trtp.SymInt32(hidden)
    return kernel.name.encode(), kernel.ptx.encode(), params, extra


# One pair of functions per form. Their signatures are what tensorrt.plugin validates: tensors (TensorDesc)
# first, then every attribute with a serializable type (1-D NumPy arrays: plugins.common.qdp_scalar says why),
# a fixed-size Tuple return; the aot_impl repeats every attribute in registration order (TensorRT passes them
# all, positionally), then `outputs` and `tactic`.


def _register_plain(plugin_id: str) -> None:
    import tensorrt.plugin as trtp

    form = (False, False)

    @trtp.register(plugin_id)  # type: ignore[untyped-decorator]
    def _desc(x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, epsilon: F32, scale: F32,
              per_token: I32, has_residual: I32, emit_normalized: I32) -> tuple[trtp.TensorDesc]:
        return _outputs(x, _checked(epsilon, scale, per_token, has_residual, emit_normalized, form))

    @trtp.aot_impl(plugin_id)  # type: ignore[untyped-decorator]
    def _aot(  # noqa: PLR0913 -- tensorrt.plugin passes every input and attribute
        x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, epsilon: F32, scale: F32,
        per_token: I32, has_residual: I32, emit_normalized: I32, outputs: tuple[trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        return _launch(x, _checked(epsilon, scale, per_token, has_residual, emit_normalized, form))


def _register_residual(plugin_id: str) -> None:
    import tensorrt.plugin as trtp

    form = (True, False)

    @trtp.register(plugin_id)  # type: ignore[untyped-decorator]
    def _desc(  # noqa: PLR0913 -- tensorrt.plugin passes every input and attribute
        x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, residual: trtp.TensorDesc,
        epsilon: F32, scale: F32, per_token: I32, has_residual: I32, emit_normalized: I32,
    ) -> tuple[trtp.TensorDesc]:
        return _outputs(x, _checked(epsilon, scale, per_token, has_residual, emit_normalized, form))

    @trtp.aot_impl(plugin_id)  # type: ignore[untyped-decorator]
    def _aot(  # noqa: PLR0913 -- tensorrt.plugin passes every input and attribute
        x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, residual: trtp.TensorDesc,
        epsilon: F32, scale: F32, per_token: I32, has_residual: I32, emit_normalized: I32,
        outputs: tuple[trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        return _launch(x, _checked(epsilon, scale, per_token, has_residual, emit_normalized, form))


def _register_normalized(plugin_id: str) -> None:
    import tensorrt.plugin as trtp

    form = (False, True)

    @trtp.register(plugin_id)  # type: ignore[untyped-decorator]
    def _desc(x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, epsilon: F32, scale: F32,
              per_token: I32, has_residual: I32,
              emit_normalized: I32) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs(x, _checked(epsilon, scale, per_token, has_residual, emit_normalized, form))

    @trtp.aot_impl(plugin_id)  # type: ignore[untyped-decorator]
    def _aot(  # noqa: PLR0913 -- tensorrt.plugin passes every input and attribute
        x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, epsilon: F32, scale: F32,
        per_token: I32, has_residual: I32, emit_normalized: I32,
        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        return _launch(x, _checked(epsilon, scale, per_token, has_residual, emit_normalized, form))


def _register_residual_normalized(plugin_id: str) -> None:
    import tensorrt.plugin as trtp

    form = (True, True)

    @trtp.register(plugin_id)  # type: ignore[untyped-decorator]
    def _desc(  # noqa: PLR0913 -- tensorrt.plugin passes every input and attribute
        x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, residual: trtp.TensorDesc,
        epsilon: F32, scale: F32, per_token: I32, has_residual: I32, emit_normalized: I32,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return _outputs(x, _checked(epsilon, scale, per_token, has_residual, emit_normalized, form))

    @trtp.aot_impl(plugin_id)  # type: ignore[untyped-decorator]
    def _aot(  # noqa: PLR0913 -- tensorrt.plugin passes every input and attribute
        x: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, residual: trtp.TensorDesc,
        epsilon: F32, scale: F32, per_token: I32, has_residual: I32, emit_normalized: I32,
        outputs: tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        return _launch(x, _checked(epsilon, scale, per_token, has_residual, emit_normalized, form))


_REGISTRARS = {
    (False, False): _register_plain,
    (True, False): _register_residual,
    (False, True): _register_normalized,
    (True, True): _register_residual_normalized,
}
