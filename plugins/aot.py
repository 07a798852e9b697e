"""Plugin room: ahead-of-time compilation of the plugin kernels to PTX and cubin, on a machine without a GPU.

Pipeline stage: engine build. ``plugin.py`` hands TensorRT the PTX of the variant a node needs; CI checks that
every supported architecture compiles. triton (and the kernels that need it) are imported inside functions.

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` needs no driver;
Triton bundles ``ptxas``, so the cubin comes with the PTX. sm_90 and newer compile as ``sm_XXa``.

TensorRT hands the PTX to the CUDA driver, which JIT-compiles it and refuses a PTX ISA newer than the driver
(Triton 3.9 writes ISA 8.8 for sm_75-89 and 9.4 for sm_90a and newer, i.e. CUDA 12.9 / 13.4 drivers). So the
build asks the driver for its CUDA version (``libcuda`` through ctypes: no torch, no toolkit) and compiles
with the newest ISA both the driver and the target accept; a driver too old for the target is refused
(table and versions: ``plugins/layernorm_quant/README.md``, section "Kernel and TensorRT").
"""

from __future__ import annotations

import ctypes
import logging
import re
from dataclasses import dataclass
from typing import Any

from calib.errors import BackendUnavailable, ConfigError, suggest
from plugins.common import check_positive_finite, check_row_width, inverse_scale

LOG = logging.getLogger(__name__)

# Compute capabilities the kernels are compiled and ptxas-checked for (tests/unit/test_plugin_aot.py), with the
# oldest PTX ISA (major*10 + minor) that can name each target: NVIDIA's PTX ISA document, "Target ISA notes".
MIN_PTX_ISA: dict[int, int] = {75: 63, 80: 70, 86: 71, 89: 78, 90: 80, 100: 86, 120: 87}
SUPPORTED_ARCHS: tuple[int, ...] = tuple(MIN_PTX_ISA)
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
            f"GPU architecture sm_{arch} is not supported by the plugin kernels; supported: "
            + ", ".join(f"sm_{a}" for a in SUPPORTED_ARCHS)
            + suggest(str(arch), [str(a) for a in SUPPORTED_ARCHS])
        )
    return arch


def driver_ptx_isa(cuda_version: int) -> int:
    """Newest PTX ISA (major*10 + minor) a driver of CUDA version ``cuda_version`` (``12040`` = 12.4) JIT-compiles.

    PTX ISA x.y ships with CUDA: 11.y -> 7.y, 12.0-12.5 -> 8.0-8.5, 12.6 -> 8.5, 12.8 -> 8.7, 12.9 -> 8.8,
    13.y -> 9.y (NVIDIA's PTX ISA release notes).
    """
    major, minor = cuda_version // 1000, (cuda_version % 1000) // 10
    if major == 11:
        return 70 + minor
    if major == 12:
        return 80 + minor - (1 if minor >= 6 else 0)
    if major >= 13:
        return 90 + (major - 13) * 10 + minor
    raise BackendUnavailable(f"CUDA driver version {major}.{minor} is too old for the plugin kernels; need >= 11.0")


def choose_ptx_isa(arch: int, cuda_version: int) -> int:
    """The PTX ISA to compile ``sm_<arch>`` with for a driver of ``cuda_version``; refuse a driver too old."""
    _check_arch(arch)
    isa = driver_ptx_isa(cuda_version)
    if isa < MIN_PTX_ISA[arch]:
        need = MIN_PTX_ISA[arch]
        cuda = f"{cuda_version // 1000}.{(cuda_version % 1000) // 10}"
        raise BackendUnavailable(
            f"the CUDA driver (CUDA {cuda}, PTX ISA {isa // 10}.{isa % 10}) cannot load PTX for sm_{arch}, "
            f"which needs PTX ISA >= {need // 10}.{need % 10}; update the NVIDIA driver"
        )
    return isa


@dataclass(frozen=True, kw_only=True)
class GpuTarget:
    """What the building GPU and its driver accept: compute capability (e.g. 89) and PTX ISA (e.g. 88)."""

    arch: int
    ptx_isa: int


def _driver() -> Any:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise BackendUnavailable(f"no NVIDIA driver here (libcuda.so.1: {exc}); plugin engines build on a GPU") from exc


def _check_cu(status: int, call: str) -> None:
    if status != 0:
        raise BackendUnavailable(f"CUDA driver call {call} failed with status {status}; is an NVIDIA GPU visible?")


def current_target() -> GpuTarget:
    """Compute capability of the GPU TensorRT builds on (the current context's device, else device 0) and the
    PTX ISA to compile for it, read from the driver API (``libcuda``), which every NVIDIA driver installs."""
    cuda = _driver()
    _check_cu(cuda.cuInit(0), "cuInit")
    device, version = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuCtxGetDevice(ctypes.byref(device)) != 0:  # no current context yet: the runtime's default device
        _check_cu(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    _check_cu(cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device), "cuDeviceGetAttribute(major)")
    _check_cu(cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device), "cuDeviceGetAttribute(minor)")
    _check_cu(cuda.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
    arch = major.value * 10 + minor.value
    return GpuTarget(arch=arch, ptx_isa=choose_ptx_isa(arch, version.value))


def _triton_ptx_isa(arch: int) -> int:
    """The PTX ISA Triton's bundled ptxas writes for ``arch`` (the cubin is compiled with it, so never exceed it)."""
    from triton.backends.nvidia.compiler import get_ptxas, ptx_get_version

    return int(ptx_get_version(get_ptxas(arch).version))


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
    divisible_ints: tuple[str, ...] = (), ptx_isa: int | None = None,
) -> Any:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = _divisibility(fn, signature, divisible_ints)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options: dict[str, Any] = {"num_warps": num_warps, "enable_fp_fusion": False}
    if ptx_isa is not None:
        if ptx_isa < MIN_PTX_ISA[arch]:
            raise ConfigError(f"PTX ISA {ptx_isa} cannot name sm_{arch}; it needs >= {MIN_PTX_ISA[arch]}")
        options["ptx_version"] = min(ptx_isa, _triton_ptx_isa(arch))
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


def compile_layernorm_quant(  # noqa: PLR0913 -- the node's attributes one to one, plus the target
    *, dtype: str, hidden: int, epsilon: float, scale: float = 1.0, per_token: bool = False,
    has_residual: bool = False, emit_normalized: bool = False, arch: int = 90, ptx_isa: int | None = None,
    exact_width: bool = True,
) -> CompiledKernel:
    """Compile the LayerNormQuantize kernel for one node's variant (constants baked in) and one arch.

    ``hidden`` is the widest row (with ``exact_width=False``, a dynamic width's profile maximum: the row is then
    always masked and never assumed a multiple of 16; the real width arrives at run time).
    """
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
        "ITERS": iters, "EVEN_H": exact_width and hidden == block_h, "HAS_RES": has_residual, "PER_TOKEN": per_token,
        "EMIT_NORM": emit_normalized,
    }
    for name in ("res_ptr", "tok_scale_ptr", "norm_ptr"):
        if signature[name] == "constexpr":
            constexprs[name] = None
    for key in ("EPS", "INV_SCALE", "BLOCK_H", "ROWS", "ITERS", "EVEN_H", "HAS_RES", "PER_TOKEN", "EMIT_NORM"):
        signature[key] = "constexpr"
    divisible = ("hidden",) if exact_width and hidden % 16 == 0 else ()
    compiled = _compile(layernorm_quant_kernel, signature, constexprs, _check_arch(arch), num_warps, divisible, ptx_isa)
    LOG.debug("compiled %s for sm_%d", compiled.metadata.name, arch)
    return _result("LayerNormQuantize", arch, compiled, num_warps, rows * iters)


def compile_softmax_quant(
    *, dtype: str, n_cols: int, scale: float, has_mask: bool = False, arch: int = 90, ptx_isa: int | None = None,
    exact_width: bool = True,
) -> CompiledKernel:
    """Compile the SoftmaxQuantize kernel for one node's variant (scale baked in) and one arch.

    ``n_cols`` is the widest row the kernel must hold (the profile maximum of a dynamic width): the block is
    sized for it and the real width arrives at run time as the ``n_cols`` argument (lanes past it are masked).
    With ``exact_width=False`` (a dynamic width) the compiler is not told the width is a multiple of 16.
    """
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
    divisible = ("n_cols",) if exact_width and n_cols % 16 == 0 else ()
    compiled = _compile(softmax_quant_kernel, signature, constexprs, _check_arch(arch), num_warps, divisible, ptx_isa)
    return _result("SoftmaxQuantize", arch, compiled, num_warps, rows)


def compile_all_archs(plugin: str, **variant: Any) -> dict[int, CompiledKernel]:
    """Compile one variant of ``plugin`` ("LayerNormQuantize" or "SoftmaxQuantize") for every supported arch."""
    compilers = {"LayerNormQuantize": compile_layernorm_quant, "SoftmaxQuantize": compile_softmax_quant}
    if plugin not in compilers:
        raise ConfigError(f"unknown plugin {plugin!r}; known: {', '.join(compilers)}" + suggest(plugin, compilers))
    fn: Any = compilers[plugin]
    return {arch: fn(arch=arch, **variant) for arch in SUPPORTED_ARCHS}
