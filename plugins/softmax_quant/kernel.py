"""Plugin room, SoftmaxQuantize: the OpenAI Triton kernel and its PyTorch launcher.

Pipeline stage: engine build (``plugins.aot`` compiles this kernel to PTX for the TensorRT plugin) and GPU
benchmarks. This module imports triton at load time because ``@triton.jit`` needs it; nothing in the package
imports it implicitly. torch is imported inside the launcher only.

The input is viewed as [D0, D1, D2, N] (leading dims padded with 1); one program handles ROWS rows. The mask
is addressed with element strides (ms0, ms1, ms2, msn), 0 along broadcast dims:

    row r = (i0 * D1 + i1) * D2 + i2        mask offset = i0*ms0 + i1*ms1 + i2*ms2 + col*msn

Arithmetic as ``reference.py``: float64 row sum, one IEEE division per row, no fused multiply-add, round
half to even by adding 1.5 * 2**23 (the code is the low byte of the sum's bits). ``tl.exp`` is the
hardware's approximate exponential on a GPU (the interpreter uses numpy's), so GPU codes may differ from
the reference by one step where e * c lies within an ulp of a rounding boundary; the GPU tests count those.

Argument order is TensorRT's ahead-of-time plugin order: inputs, int32 extra arguments, outputs; the scale is
a compile-time constant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit  # type: ignore[untyped-decorator]
def softmax_quant_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0913 -- ABI fixed by TensorRT AOT order
    x_ptr, mask_ptr, n_rows, n_cols, d1, d2, ms0, ms1, ms2, msn, q_ptr,
    SCALE: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, HAS_MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]

    z = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_MASK:
        i2 = rows % d2
        i1 = (rows // d2) % d1
        i0 = rows // (d1 * d2)
        moffs = (i0.to(tl.int64) * ms0 + i1 * ms1 + i2 * ms2)[:, None] + cols[None, :] * msn
        z = z + tl.load(mask_ptr + moffs, mask=ok, other=0.0).to(tl.float32)
    z = tl.where(ok, z, float("-inf"))
    m = tl.max(z, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    e = tl.exp(z - m[:, None])
    s = tl.sum(e.to(tl.float64), axis=1).to(tl.float32)
    denom = s * SCALE
    c = tl.where(s > 0.0, tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), denom), 0.0)
    t = tl.minimum(tl.maximum(e * c[:, None], -128.0), 127.0) + _ROUND_MAGIC
    # the low byte of t's bits is the rounded integer in two's complement: no float-to-int conversion
    tl.store(q_ptr + offs, t.to(tl.int32, bitcast=True).to(tl.int8), mask=ok)


def launch_config(n_cols: int) -> tuple[int, int, int]:
    """Return ``(BLOCK_N, ROWS, num_warps)`` for a row width."""
    block_n = max(16, triton.next_power_of_2(n_cols))
    rows = max(1, 2048 // block_n)  # measured on an H100: about 2K lanes and 4 warps per program are best
    lanes = block_n * rows
    num_warps = 4 if lanes <= 4096 else 8 if lanes <= 8192 else 16
    return block_n, rows, num_warps


def broadcast_strides(x_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Element strides of a contiguous mask along the [D0, D1, D2, N] view of ``x``; 0 where broadcast."""
    del x_shape  # the mask aligns to the right (numpy broadcasting); x is always viewed as rank 4
    mshape = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
    strides = [0, 0, 0, 0]
    step = 1
    for axis in range(3, -1, -1):
        strides[axis] = step if mshape[axis] != 1 else 0
        step *= mshape[axis]
    return strides[0], strides[1], strides[2], strides[3]


def softmax_quantize(
    x: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float, tuning: tuple[int, int] | None = None
) -> torch.Tensor:
    """Run the kernel on a rank 1..4 tensor (mask broadcastable to it); return the INT8 codes.

    ``tuning`` = ``(ROWS, num_warps)`` overrides :func:`launch_config` (benchmark sweeps).
    """
    import torch

    from plugins.common import check_row_width
    from plugins.softmax_quant.schema import MAX_RANK, check_mask_shape

    if not 1 <= x.dim() <= MAX_RANK:
        raise ValueError(f"SoftmaxQuantize takes rank 1..{MAX_RANK}, got rank {x.dim()}")
    n_cols = check_row_width("SoftmaxQuantize row width", x.shape[-1])
    x = x.contiguous()
    shape4 = (1,) * (4 - x.dim()) + tuple(x.shape)
    n_rows = x.numel() // n_cols
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    strides = (0, 0, 0, 0)
    if mask is not None:
        check_mask_shape(tuple(x.shape), tuple(mask.shape))
        mask = mask.contiguous()
        strides = broadcast_strides(tuple(x.shape), tuple(mask.shape))
    block_n, rows, num_warps = launch_config(n_cols)
    if tuning is not None:
        rows, num_warps = tuning
    grid = (triton.cdiv(n_rows, rows),)
    softmax_quant_kernel[grid](
        x, mask, n_rows, n_cols, shape4[1], shape4[2], *strides, q,
        SCALE=float(scale), BLOCK_N=block_n, ROWS=rows, HAS_MASK=mask is not None,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return q
