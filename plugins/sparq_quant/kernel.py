"""Plugin room, SparqQuantize: the OpenAI Triton kernel, its PyTorch launcher and its ahead-of-time compile.

Pipeline stage: engine build (``plugin.py`` hands TensorRT the PTX compiled here) and kernel tests. This module
imports triton at load time because ``@triton.jit`` needs it; nothing in the package imports it implicitly.
torch is imported inside the launcher only.

One program quantizes BLOCK vSPARQ pairs: a [BLOCK, 2] tile of consecutive elements along the last axis
(contiguous in memory, so loads and stores coalesce), both members of each pair in one row of the tile:

    pair g = row * ceil(K / 2) + j          tile row g:  x[row, 2j]  x[row, 2j + 1]   (2j + 1 = K: masked, 0)
    q = sat_int8(round_half_even(x / SCALE))  ->  trimmed codes (bSPARQ; vSPARQ: 2n bits next to a zero)

Numerics equal ``reference.py`` (``calib.sparq``) bit for bit: IEEE division by the scale (``div_rn``, as
ONNX QuantizeLinear and ``calib.quant.quantize``), round half to even by adding 1.5 * 2**23 (exact for
|t| <= 2**22; t is clamped to [-128, 127] first), then the integer window arithmetic of ``calib.sparq``.
Argument order is TensorRT's ahead-of-time plugin order (inputs, int32 extra arguments, outputs); the scale
and the SPARQ options are compile-time constants because TensorRT does not serialize AOT plugin attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import triton
import triton.language as tl

from calib.sparq import ACTIVATION_BITS, Rounding, SparqConfig, window_step

if TYPE_CHECKING:
    import torch

    from plugins.aot import CompiledKernel

# adding and subtracting 1.5 * 2**23 rounds a float32 |t| <= 2**22 to an integer, half to even
_ROUND_MAGIC = tl.constexpr(12582912.0)
DEFAULT_BLOCK = 512  # pairs per program
NUM_WARPS = 4


@triton.jit  # type: ignore[untyped-decorator]
def _trim(q, N: tl.constexpr, P: tl.constexpr, D: tl.constexpr, NEAREST: tl.constexpr):  # type: ignore[no-untyped-def]
    # codes q (int32, -128..127) -> window values with the sign put back (calib.sparq.trim_magnitude)
    neg = q < 0
    m = tl.abs(q)
    shift = tl.zeros_like(m)
    step = tl.full(m.shape, 1, tl.int32)
    for j in tl.static_range(1, P):  # window j (from the bottom) once m reaches 2**(n + (j-1)d)
        reached = m >= (1 << (N + (j - 1) * D))
        shift = tl.where(reached, j * D, shift)
        step = tl.where(reached, 1 << (j * D), step)
    kept = m >> shift
    if NEAREST:  # round half to even: + half an LSB - 1, + 1 more when the kept LSB is odd
        kept = (m + tl.where(shift > 0, (step >> 1) - 1 + (kept & 1), 0)) >> shift
    ceiling = tl.where(neg, 128, 127)
    r = tl.minimum(kept, tl.minimum(ceiling >> shift, (1 << N) - 1)) * step
    return tl.where(neg, -r, r)


@triton.jit  # type: ignore[untyped-decorator]
def sparq_quant_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0913 -- ABI fixed by TensorRT AOT order
    x_ptr, n_rows, n_cols, q_ptr,
    SCALE: tl.constexpr, N_BITS: tl.constexpr, PLACEMENTS: tl.constexpr, STEP: tl.constexpr,
    NEAREST: tl.constexpr, VSPARQ: tl.constexpr, WIDE_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    half_cols = (n_cols + 1) // 2
    g = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = g // half_cols
    col = (2 * (g - row * half_cols))[:, None] + tl.arange(0, 2)[None, :]
    ok = (row < n_rows)[:, None] & (col < n_cols)
    offs = row[:, None] * n_cols + col
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    t = tl.math.div_rn(x, tl.full([BLOCK, 2], SCALE, tl.float32))
    t = tl.minimum(tl.maximum(t, -128.0), 127.0) + _ROUND_MAGIC
    # the low byte of t's bits is the rounded code in two's complement: no float-to-int conversion
    q = t.to(tl.int32, bitcast=True).to(tl.int8).to(tl.int32)
    r = _trim(q, N_BITS, PLACEMENTS, STEP, NEAREST)
    if VSPARQ:  # a masked partner loads 0.0 -> code 0: the kernel's zero padding of an odd last element
        has_zero = tl.min(tl.abs(q), axis=1) == 0
        if WIDE_BITS >= 8:  # noqa: SIM108 -- a constexpr branch: only one side is compiled
            wide = q
        else:
            wide = _trim(q, WIDE_BITS, 9 - WIDE_BITS, 1, NEAREST)
        r = tl.where(has_zero[:, None], wide, r)
    tl.store(q_ptr + offs, r.to(tl.int8), mask=ok)


def constexprs(scale: float, config: SparqConfig, block: int = DEFAULT_BLOCK) -> dict[str, Any]:
    """The kernel's compile-time constants for one node (scale and SPARQ options baked in)."""
    from plugins.common import check_positive_finite

    return {
        "SCALE": check_positive_finite("SparqQuantize scale", scale),
        "N_BITS": config.window_bits,
        "PLACEMENTS": config.positions,
        "STEP": window_step(config.window_bits, config.positions),
        "NEAREST": config.rounding is Rounding.NEAREST_EVEN,
        "VSPARQ": config.vsparq,
        "WIDE_BITS": config.wide_bits if config.vsparq else ACTIVATION_BITS,
        "BLOCK": block,
    }


def sparq_quantize(x: torch.Tensor, *, scale: float, config: SparqConfig, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Run the kernel on a contiguous tensor [..., K]; return the SPARQ-trimmed INT8 codes, shaped like ``x``."""
    import torch

    from plugins.sparq_quant.schema import check_input_shape

    check_input_shape(tuple(x.shape))
    x = x.contiguous()
    n_cols = int(x.shape[-1])
    n_rows = x.numel() // n_cols
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    grid = (triton.cdiv(n_rows * ((n_cols + 1) // 2), block),)
    sparq_quant_kernel[grid](x, n_rows, n_cols, q, **constexprs(scale, config, block), num_warps=NUM_WARPS,
                             enable_fp_fusion=False)
    return q


def compile_sparq_quant(
    *, dtype: str, scale: float, config: SparqConfig, arch: int = 90, ptx_isa: int | None = None,
) -> CompiledKernel:
    """Compile the kernel for one node's variant (constants baked in) and one architecture, without a GPU."""
    from plugins import aot

    ty = aot._triton_type(dtype)
    signature = {"x_ptr": f"*{ty}", "n_rows": "i32", "n_cols": "i32", "q_ptr": "*i8"}
    consts = constexprs(scale, config)
    signature.update(dict.fromkeys(consts, "constexpr"))
    compiled = aot._compile(sparq_quant_kernel, signature, consts, aot._check_arch(arch), NUM_WARPS,
                            ptx_isa=ptx_isa)
    return aot._result("SparqQuantize", arch, compiled, NUM_WARPS, DEFAULT_BLOCK)
