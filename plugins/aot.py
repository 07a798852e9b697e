"""Plugin room: ahead-of-time compilation of the plugin kernels to PTX and cubin, on a machine without a GPU.

Pipeline stage: engine build. ``plugin.py`` hands TensorRT the PTX of the variant a node needs; CI checks that
every supported architecture compiles. triton (and the kernels that need it) are imported inside functions.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` needs no driver;
Triton bundles ``ptxas``, so the cubin comes with the PTX. sm_90 compiles as ``sm_90a``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from calib.errors import ConfigError, suggest
from plugins.common import check_positive_finite, check_row_width, inverse_scale

LOG = logging.getLogger(__name__)

SUPPORTED_ARCHS: tuple[int, ...] = (80, 86, 89, 90)
_DTYPES: dict[str, str] = {"float32": "fp32", "float16": "fp16"}


@dataclass(frozen=True, kw_only=True)
class CompiledKernel:
    """One kernel variant compiled for one architecture: what TensorRT's AOT plugin interface takes."""

    plugin: str
    arch: int
    name: str
    ptx: str
    cubin: bytes
    num_warps: int
    shared_bytes: int
    rows_per_program: int

    @property
    def threads_per_block(self) -> int:
        return self.num_warps * 32


def _check_arch(arch: int) -> int:
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(
            f"GPU architecture sm_{arch} is not supported; use one of "
            + ", ".join(f"sm_{a}" for a in SUPPORTED_ARCHS)
            + suggest(str(arch), [str(a) for a in SUPPORTED_ARCHS])
        )
    return arch


def _triton_type(dtype: str) -> str:
    if dtype not in _DTYPES:
        raise ConfigError(
            f"kernel dtype {dtype!r} is not supported; use {', '.join(_DTYPES)}" + suggest(dtype, _DTYPES)
        )
    return _DTYPES[dtype]


def _divisibility(fn: Any, signature: dict[str, str], divisible_ints: tuple[str, ...]) -> dict[tuple[int, ...], Any]:
    """Tell the compiler what the JIT would specialize: pointers 16-byte aligned, widths multiples of 16.

    TensorRT allocates tensors 256-byte aligned; without these hints the loads are not vectorized.
    """
    names = list(fn.arg_names)
    hinted = [n for n, ty in signature.items() if ty.startswith("*")] + list(divisible_ints)
    return {(names.index(n),): [["tt.divisibility", 16]] for n in hinted}


def _compile(
    fn: Any, signature: dict[str, str], constexprs: dict[str, Any], arch: int, num_warps: int,
    divisible_ints: tuple[str, ...] = (),
) -> Any:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = _divisibility(fn, signature, divisible_ints)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "enable_fp_fusion": False}
    return triton_compile(source, target=GPUTarget("cuda", arch, 32), options=options)


_PARAM = re.compile(r"^\s*\.param\s+[^\n]*?\b(\w+_param_(\d+))\s*,?\s*$", re.MULTILINE)


def strip_unused_trailing_params(ptx: str) -> str:
    """Drop trailing kernel parameters the body never reads.

    Triton (3.3+) appends two scratch-pointer parameters (global and profile scratch) to every kernel; a
    kernel that allocates no scratch never reads them. TensorRT's AOT plugin launch passes exactly the
    inputs, the extra int32 arguments and the outputs, so the PTX signature must end there.
    """
    params = list(_PARAM.finditer(ptx))
    while params and ptx.count(params[-1].group(1)) == 1:  # declared, never loaded
        params.pop()
    if not params:
        return ptx
    all_params = list(_PARAM.finditer(ptx))
    if len(all_params) == len(params):
        return ptx
    last_kept, first_dropped = params[-1], all_params[len(params)]
    head = ptx[: last_kept.start()] + last_kept.group(0).rstrip().rstrip(",") + "\n"
    tail_start = all_params[-1].end()
    del first_dropped
    return head + ptx[tail_start:].lstrip("\n")


def _result(plugin: str, arch: int, compiled: Any, num_warps: int, rows: int) -> CompiledKernel:
    return CompiledKernel(
        plugin=plugin, arch=arch, name=str(compiled.metadata.name),
        ptx=strip_unused_trailing_params(str(compiled.asm["ptx"])),
        cubin=bytes(compiled.asm.get("cubin", b"")), num_warps=num_warps,
        shared_bytes=int(compiled.metadata.shared), rows_per_program=rows,
    )


def compile_layernorm_quant(
    *, dtype: str, hidden: int, epsilon: float, scale: float = 1.0, per_token: bool = False,
    has_residual: bool = False, emit_normalized: bool = False, arch: int = 90,
) -> CompiledKernel:
    """Compile the LayerNormQuantize kernel for one node's variant (constants baked in) and one arch."""
    from plugins.layernorm_quant.kernel import launch_config, layernorm_quant_kernel

    ty = _triton_type(dtype)
    check_row_width("LayerNormQuantize hidden size", hidden)
    check_positive_finite("LayerNormQuantize epsilon", epsilon)
    check_positive_finite("LayerNormQuantize scale", scale)
    block_h, rows, num_warps, iters = launch_config(hidden)
    signature = {
        "x_ptr": f"*{ty}", "gamma_ptr": f"*{ty}", "beta_ptr": f"*{ty}",
        "res_ptr": f"*{ty}" if has_residual else "constexpr",
        "n_rows": "i32", "hidden": "i32", "q_ptr": "*i8",
        "tok_scale_ptr": "*fp32" if per_token else "constexpr",
        "norm_ptr": f"*{ty}" if emit_normalized else "constexpr",
    }
    constexprs: dict[str, Any] = {
        "EPS": float(epsilon), "INV_SCALE": inverse_scale(scale), "BLOCK_H": block_h, "ROWS": rows,
        "ITERS": iters, "EVEN_H": hidden == block_h, "HAS_RES": has_residual, "PER_TOKEN": per_token,
        "EMIT_NORM": emit_normalized,
    }
    for name in ("res_ptr", "tok_scale_ptr", "norm_ptr"):
        if signature[name] == "constexpr":
            constexprs[name] = None
    for key in ("EPS", "INV_SCALE", "BLOCK_H", "ROWS", "ITERS", "EVEN_H", "HAS_RES", "PER_TOKEN", "EMIT_NORM"):
        signature[key] = "constexpr"
    divisible = ("hidden",) if hidden % 16 == 0 else ()
    compiled = _compile(layernorm_quant_kernel, signature, constexprs, _check_arch(arch), num_warps, divisible)
    LOG.debug("compiled %s for sm_%d", compiled.metadata.name, arch)
    return _result("LayerNormQuantize", arch, compiled, num_warps, rows * iters)


def compile_softmax_quant(
    *, dtype: str, n_cols: int, scale: float, has_mask: bool = False, arch: int = 90,
) -> CompiledKernel:
    """Compile the SoftmaxQuantize kernel for one node's variant (scale baked in) and one arch."""
    from plugins.softmax_quant.kernel import launch_config, softmax_quant_kernel

    ty = _triton_type(dtype)
    check_row_width("SoftmaxQuantize row width", n_cols)
    check_positive_finite("SoftmaxQuantize scale", scale)
    block_n, rows, num_warps = launch_config(n_cols)
    signature = {
        "x_ptr": f"*{ty}", "mask_ptr": f"*{ty}" if has_mask else "constexpr",
        "n_rows": "i32", "n_cols": "i32", "d1": "i32", "d2": "i32",
        "ms0": "i32", "ms1": "i32", "ms2": "i32", "msn": "i32", "q_ptr": "*i8",
        "SCALE": "constexpr", "BLOCK_N": "constexpr", "ROWS": "constexpr", "HAS_MASK": "constexpr",
    }
    constexprs: dict[str, Any] = {"SCALE": float(scale), "BLOCK_N": block_n, "ROWS": rows, "HAS_MASK": has_mask}
    if not has_mask:
        constexprs["mask_ptr"] = None
    divisible = ("n_cols",) if n_cols % 16 == 0 else ()
    compiled = _compile(softmax_quant_kernel, signature, constexprs, _check_arch(arch), num_warps, divisible)
    return _result("SoftmaxQuantize", arch, compiled, num_warps, rows)


def compile_all_archs(plugin: str, **variant: Any) -> dict[int, CompiledKernel]:
    """Compile one variant of ``plugin`` ("LayerNormQuantize" or "SoftmaxQuantize") for every supported arch."""
    compilers = {"LayerNormQuantize": compile_layernorm_quant, "SoftmaxQuantize": compile_softmax_quant}
    if plugin not in compilers:
        raise ConfigError(f"unknown plugin {plugin!r}; known: {', '.join(compilers)}" + suggest(plugin, compilers))
    fn: Any = compilers[plugin]
    return {arch: fn(arch=arch, **variant) for arch in SUPPORTED_ARCHS}
