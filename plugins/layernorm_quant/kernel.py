"""Plugin room, LayerNormQuantize: the OpenAI Triton kernel and its PyTorch launcher.

Pipeline stage: engine build (``plugins.aot`` compiles this kernel to PTX for the TensorRT plugin) and GPU
benchmarks. This module imports triton at load time because ``@triton.jit`` needs it; nothing in the package
imports it implicitly. torch is imported inside the launcher only.

One program normalizes ITERS blocks of ROWS rows of BLOCK_H lanes (H valid) in one pass over HBM: x (and the
residual) are read once, the INT8 codes (and the optional per-token scale and normalized copy) written once;
gamma and beta are loaded once per program.

    program p, iteration i:  rows (p*ITERS + i)*ROWS .. +ROWS-1
                +---------------- BLOCK_H lanes ----------------+
      row r     | x[r, 0:H] + res[r, 0:H] | padding (masked, 0) |
                +-----------------------------------------------+
                 sum_f64 -> mean; sum_f64(d*d) -> var; y; quantize; store

The arithmetic is exactly the reference's (see ``reference.py``): float64 row sums, IEEE division and square
root (``div_rn``/``sqrt_rn``) once per row, a multiply by the float32 reciprocal scale per element, no fused
multiply-add (compiled with ``enable_fp_fusion=False``), and round half to even by adding 1.5 * 2**23, exact
for |t| <= 2**22 (t is clamped to [-128, 127] first); the code is the low byte of the sum's bits.

Argument order is TensorRT's ahead-of-time plugin order: inputs, int32 extra arguments, outputs; epsilon and
the static scale's reciprocal are compile-time constants because TensorRT does not serialize AOT plugin attributes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

# adding and subtracting 1.5 * 2**23 rounds a float32 |t| <= 2**22 to an integer, half to even
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit  # type: ignore[untyped-decorator]
def layernorm_quant_kernel(  # type: ignore[no-untyped-def]  # noqa: PLR0913 -- ABI fixed by TensorRT AOT order
    x_ptr, gamma_ptr, beta_ptr, res_ptr, n_rows, hidden, q_ptr, tok_scale_ptr, norm_ptr,
    EPS: tl.constexpr, INV_SCALE: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, ITERS: tl.constexpr,
    EVEN_H: tl.constexpr, HAS_RES: tl.constexpr, PER_TOKEN: tl.constexpr, EMIT_NORM: tl.constexpr,
):
    # program p handles row blocks p*ITERS .. p*ITERS+ITERS-1 of ROWS rows; gamma and beta are loaded once
    cols = tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for it in range(ITERS):
        rows = (tl.program_id(0) * ITERS + it) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        if EVEN_H:  # noqa: SIM108 -- hidden == BLOCK_H: no padded lanes, no column mask, no zeroing of d
            ok = tl.broadcast_to(row_ok[:, None], [ROWS, BLOCK_H])
        else:
            ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * hidden + cols[None, :]
        v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_RES:
            v = v + tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        # float64 values live only inside each reduction: a float64 copy of the row would double the
        # registers per thread and halve the warps in flight
        mean = (tl.sum(v.to(tl.float64), axis=1) / hidden).to(tl.float32)
        d = v - mean[:, None]
        if not EVEN_H:
            d = tl.where(ok, d, 0.0)
        d64 = d.to(tl.float64)
        var = (tl.sum(d64 * d64, axis=1) / hidden).to(tl.float32)
        rstd = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.sqrt_rn(var + EPS))
        y = ((d * rstd[:, None]) * gamma[None, :]) + beta[None, :]
        if PER_TOKEN:
            amax = tl.max(tl.where(ok, tl.abs(y), 0.0), axis=1)
            scale = tl.where(amax > 0.0, tl.math.div_rn(amax, tl.full([ROWS], 127.0, tl.float32)), 1.0)
            inverse = tl.where(amax > 0.0, tl.math.div_rn(tl.full([ROWS], 127.0, tl.float32), amax), 1.0)
            tl.store(tok_scale_ptr + rows, scale, mask=row_ok)
            t = y * inverse[:, None]
        else:
            t = y * INV_SCALE
        t = tl.minimum(tl.maximum(t, -128.0), 127.0) + _ROUND_MAGIC
        # the low byte of t's bits is the rounded integer in two's complement: no float-to-int conversion
        tl.store(q_ptr + offs, t.to(tl.int32, bitcast=True).to(tl.int8), mask=ok)
        if EMIT_NORM:
            tl.store(norm_ptr + offs, y.to(norm_ptr.dtype.element_ty), mask=ok)


def launch_config(hidden: int) -> tuple[int, int, int, int]:
    """Return ``(BLOCK_H, ROWS, num_warps, ITERS)`` for a row width (ITERS row blocks per program).

    From a sweep on an H100 (fp16, CUDA-graph timing): one warp per row up to 1024 lanes (the row reductions
    then need no shared memory or barrier), 2 rows x 4 warps at 4096, four row blocks per program.
    """
    block_h = max(16, triton.next_power_of_2(hidden))
    if block_h <= 1024:
        rows, num_warps = max(1, 1024 // block_h), 1
    elif block_h <= 4096:
        rows, num_warps = block_h // 2048, block_h // 1024
    else:
        rows, num_warps = 1, min(16, block_h // 512)
    return block_h, rows, num_warps, 4 if block_h <= 4096 else 1


def layernorm_quantize(  # noqa: PLR0913 -- mirrors the node's inputs and attributes one to one
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    epsilon: float,
    scale: float = 1.0,
    per_token: bool = False,
    emit_normalized: bool = False,
    tuning: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run the kernel on contiguous tensors; return ``(q, token_scale, normalized)`` (None where not asked).

    ``tuning`` = ``(ROWS, num_warps, ITERS)`` overrides :func:`launch_config` (benchmark sweeps).
    """
    import torch

    from plugins.common import check_row_width, inverse_scale

    hidden = check_row_width("LayerNormQuantize hidden size", x.shape[-1])
    x = x.contiguous()
    n_rows = x.numel() // hidden
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    tok = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device) if per_token else None
    norm = torch.empty_like(x) if emit_normalized else None
    block_h, rows, num_warps, iters = launch_config(hidden)
    if tuning is not None:
        rows, num_warps, iters = tuning
    grid = (triton.cdiv(n_rows, rows * iters),)
    layernorm_quant_kernel[grid](
        x, gamma.contiguous(), beta.contiguous(),
        residual.contiguous() if residual is not None else None,
        n_rows, hidden, q, tok, norm,
        EPS=float(epsilon), INV_SCALE=inverse_scale(scale), BLOCK_H=block_h, ROWS=rows, ITERS=iters,
        EVEN_H=hidden == block_h, HAS_RES=residual is not None, PER_TOKEN=per_token, EMIT_NORM=emit_normalized,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return q, tok, norm
