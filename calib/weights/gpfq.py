"""Weight quantization stage: GPFQ (greedy path following) in brevitas' matrix form, with optional AXE.

Lybrand & Saab 2021, arXiv 2010.15979; Zhang, Zhou & Saab 2023, arXiv 2201.11113. For one output channel with
float weights w, the float model's input columns X_t and the quantized model's X~_t (vectors over the
calibration rows), u_0 = 0 and for t = 1..K:

    q_t = Q( <X~_t, u_{t-1} + w_t X_t> / ||X~_t||^2 ),      u_t = u_{t-1} + w_t X_t - q_t X~_t

so the greedy choice also corrects the error already present in the quantized inputs. Unrolling u_{t-1} gives
brevitas' form (v0.12.1, ``src/brevitas/graph/gpfq.py``) on H~ = X~^T X~ and G = X~^T X:

    argument_t = (G_tt / H~_tt) w_t + sum_{j<t} (G_tj / H~_tt) w_j - sum_{j<t} (H~_tj / H~_tt) q_j

(q_j dequantized). Inputs with H~_tt = 0 get argument 0; the history sums use the original float weights of
every input, dead or not. Rows here are our W [K, N]'s inputs; all channels step together. With AXE the argument
is soft-thresholded and clamped before rounding (``A2GPFQ`` in ``src/brevitas_examples/common/axe.py``);
later steps compensate the displacement through the q history.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from calib.weights.accumulator import check_target
from calib.weights.axe import AxeConstraint
from calib.weights.config import GpfqConfig
from calib.weights.grid import F32, F64, QuantizedWeight, check_scales, check_weight, round_to_grid, row_scales
from calib.weights.optq import check_square
from calib.weights.rtn import choose_scales

LAZY_ROWS = 128  # rows whose history term is brought up to date with one matrix product


def _normalized(h: F64, g: F64) -> tuple[F64, F64, F64]:
    """(D_G / D_H, D_H^-1 tril(G, -1), D_H^-1 tril(H, -1)); zero where D_H (or D_G) is zero."""
    dg, dh = np.diag(g), np.diag(h)
    ratio = np.divide(dg, dh, out=np.zeros_like(dg), where=(dg * dh) != 0)
    inv = np.divide(1.0, dh, out=np.zeros_like(dh), where=dh != 0)
    return ratio, inv[:, None] * np.tril(g, -1), inv[:, None] * np.tril(h, -1)


def gpfq(weight: npt.NDArray[np.floating], h_quant: npt.NDArray[np.floating], g_cross: npt.NDArray[np.floating],
         config: GpfqConfig, *, scales: F32 | None = None) -> QuantizedWeight:
    """GPFQ codes of ``weight`` [K, N] from H~ = X~^T X~ and G = X~^T X (any common normalization).

    ``G[i, j] = sum_n X~[n, i] X[n, j]`` (quantized-model input on the row index); see
    :class:`calib.weights.hessian.GpfqObserver`. ``scales`` (optional) replaces the scale method.
    """
    k, n = check_weight(weight, config.block)
    h = check_square(h_quant, k, "H~ (X~^T X~)")
    g = check_square(g_cross, k, "G (X~^T X)")
    tile = check_target(config.accumulator, k, config.bits, config.block) if config.accumulator else None
    w = np.asarray(weight, dtype=np.float64)
    s = (choose_scales(weight, config.bits, config.block, config.scale_method) if scales is None
         else check_scales(scales, k, n, config.block))
    srows = np.array(row_scales(s, k, config.block), dtype=np.float64)
    perm = np.argsort(-np.diag(h), kind="stable") if config.act_order else np.arange(k)
    ratio, lg, lh = _normalized(h[np.ix_(perm, perm)], g[np.ix_(perm, perm)])
    wp, sp = w[perm], srows[perm]
    base = ratio[:, None] * wp + lg @ wp  # the float-weight part of every argument
    axe = None
    if config.accumulator is not None and tile is not None:
        live = np.where((np.diag(h) != 0)[:, None], w, 0.0)
        axe = AxeConstraint(config.accumulator, live, srows, tile)
    dequantized = np.zeros((k, n), dtype=np.float64)
    codes = np.zeros((k, n), dtype=np.int8)
    for i1 in range(0, k, LAZY_ROWS):
        i2 = min(i1 + LAZY_ROWS, k)
        history = lh[i1:i2, :i1] @ dequantized[:i1]  # sum over earlier lazy blocks
        for t in range(i1, i2):
            argument = base[t] - history[t - i1] - lh[t, i1:t] @ dequantized[i1:t]
            if axe is not None:
                argument = axe.constrain(int(perm[t]), argument, sp[t])
            q = round_to_grid(argument / sp[t], config.bits)
            if axe is not None:
                axe.record(int(perm[t]), q)
            codes[t] = q
            dequantized[t] = sp[t] * q
    out = np.empty_like(codes)
    out[perm] = codes
    return QuantizedWeight(values=out, scales=s, bits=config.bits, block=config.block)
