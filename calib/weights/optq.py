"""Weight quantization stage: OPTQ/GPTQ with lazy batch updates, act-order and optional AXE.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ", arXiv 2210.17323, algorithm 1; structure as in brevitas
v0.12.1 ``src/brevitas/graph/gptq.py`` and, with AXE, ``src/brevitas_examples/common/axe.py`` (``A2GPTQ``).
Rows of our W [K, N] are the paper's columns (one input feature each):

    H = 2/n X^T X  (calib.weights.hessian)   dead inputs (H_kk = 0): H_kk = 1, W[k, :] = 0
    act-order: permute inputs by descending diag(H)         H += percdamp * mean(diag H) * I
    U = upper Cholesky factor of H^-1  (U^T U = H^-1)
    for each lazy block [i1, i2) of rows:                   for each row t in the block:
        (per-block scales: at a block start, recompute the block's scales from the current weights)
        (MSE scales weigh input k's rounding error by H_kk, the diagonal of the output error OPTQ minimises)
        a = W[t]  (AXE: soft threshold, then the running clamp; W[t] = a)
        q = round(a / s);  e = (a - s q) / U[t, t];  W[t:i2] -= U[t, t:i2]^T e;  E[t - i1] = e
        W[i2:] -= U[i1:i2, i2:]^T E                          (the lazy update of the remaining rows)

The propagated error uses the thresholded/clamped argument a, so AXE's own displacement is not compensated
(as in brevitas). Internal arithmetic is float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from calib.errors import CalibrationError, ConfigError
from calib.weights.accumulator import check_target
from calib.weights.axe import AxeConstraint
from calib.weights.config import OptqConfig, ScaleMethod
from calib.weights.grid import F32, F64, I8, QuantizedWeight, check_scales, check_weight, round_to_grid, row_scales
from calib.weights.rtn import choose_scales


def check_square(matrix: npt.NDArray[np.generic], k: int, what: str) -> F64:
    """A finite float [K, K] matrix as a float64 copy."""
    m = np.asarray(matrix)
    if m.shape != (k, k):
        raise ConfigError(f"{what} must be [{k}, {k}] for a weight with K={k} inputs, got {list(m.shape)}")
    if not np.issubdtype(m.dtype, np.floating) or not np.all(np.isfinite(m)):
        raise ConfigError(f"{what} must be finite floating point")
    out: F64 = m.astype(np.float64, copy=True)
    return out


def inverse_cholesky_upper(hessian: F64, percdamp: float) -> F64:
    """U upper triangular with U^T U = (H + percdamp * mean(diag H) * I)^-1."""
    import scipy.linalg

    h = hessian.copy()
    h[np.diag_indices_from(h)] += percdamp * float(np.mean(np.diag(h)))
    try:
        lower = scipy.linalg.cholesky(h, lower=True)
        inverse = scipy.linalg.cho_solve((lower, True), np.eye(h.shape[0]))
        upper: F64 = scipy.linalg.cholesky(inverse, lower=False)
    except np.linalg.LinAlgError as exc:
        raise CalibrationError(f"the Hessian is not positive definite after damping with percdamp={percdamp} "
                               f"({exc}); use more calibration rows or a larger percdamp") from exc
    return upper


@dataclass
class _Pass:
    """The mutable state of one OPTQ pass over the permuted rows."""

    w: F64  # [K, N] weights, permuted, updated in place
    u: F64  # [K, K] upper Cholesky factor of the permuted, damped H^-1
    perm: npt.NDArray[np.int64]  # permuted row t holds original input perm[t]
    srows: F64  # [K, N] per-element scales, permuted (per-block recomputed rows filled at block starts)
    config: OptqConfig
    codes: I8  # [K, N] output codes, permuted
    block_scales: F32 | None = None  # [K/B, N] when per-block scales are recomputed during the pass
    axe: AxeConstraint | None = None
    importance: F64 | None = None  # [K] diag(H), permuted: each input's weight in the MSE scale search

    def recompute_block(self, t: int, i1: int, pending: F64) -> None:
        """Scales of the block starting at row t from the current weights (pending lazy updates included)."""
        block = self.config.block
        assert block is not None and self.block_scales is not None
        i2 = i1 + pending.shape[0]
        rows = self.w[t:t + block].copy()
        beyond = max(i2 - t, 0)  # rows at or after i2 still owe this lazy block's updates
        if beyond < block:
            count = t - i1
            rows[beyond:] -= self.u[i1:t, i2:t + block].T @ pending[:count]
        weights = None if self.importance is None else self.importance[t:t + block]
        s = choose_scales(rows, self.config.bits, None, self.config.scale_method, weights)
        self.block_scales[t // block] = s
        self.srows[t:t + block] = s.astype(np.float64)[None, :]

    def step(self, t: int, i2: int) -> F64:
        """Quantize row t, spread its error over rows t+1..i2-1; return the error row e."""
        argument = self.w[t]
        if self.axe is not None:
            argument = self.axe.constrain(int(self.perm[t]), argument, self.srows[t])
            self.w[t] = argument
        q = round_to_grid(argument / self.srows[t], self.config.bits)
        if self.axe is not None:
            self.axe.record(int(self.perm[t]), q)
        self.codes[t] = q
        error: F64 = (argument - self.srows[t] * q) / self.u[t, t]
        self.w[t + 1:i2] -= np.outer(self.u[t, t + 1:i2], error)
        return error

    def run(self) -> None:
        k, n = self.w.shape
        lazy = self.config.lazy_block
        for i1 in range(0, k, lazy):
            i2 = min(i1 + lazy, k)
            errors = np.zeros((i2 - i1, n), dtype=np.float64)
            for t in range(i1, i2):
                if self.block_scales is not None and t % (self.config.block or 1) == 0:
                    self.recompute_block(t, i1, errors[: i2 - i1])
                errors[t - i1] = self.step(t, i2)
            self.w[i2:] -= self.u[i1:i2, i2:].T @ errors


def optq(weight: npt.NDArray[np.floating], hessian: npt.NDArray[np.floating], config: OptqConfig,
         *, scales: F32 | None = None) -> QuantizedWeight:
    """OPTQ codes of ``weight`` [K, N] given OPTQ's Hessian H = 2/n X^T X [K, K] of its input.

    ``scales`` (optional, [N] or [K/B, N]) replaces the scale method and fixes every scale before the pass.
    Raises ConfigError on bad shapes or options and CalibrationError when H is not positive definite.
    """
    k, n = check_weight(weight, config.block)
    h = check_square(hessian, k, "Hessian")
    tile = check_target(config.accumulator, k, config.bits, config.block) if config.accumulator else None
    w = np.asarray(weight, dtype=np.float64).copy()
    recompute = config.block is not None and not config.static_block_scales and scales is None
    importance = np.diag(h).copy()  # MSE scales weigh each input's rounding error by H_kk (its output effect)
    if scales is not None:
        s = check_scales(scales, k, n, config.block)
    else:
        s = choose_scales(weight, config.bits, config.block, config.scale_method, importance)
    dead = importance == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if config.act_order else np.arange(k)
    srows = np.array(row_scales(s, k, config.block), dtype=np.float64)
    axe = AxeConstraint(config.accumulator, w, srows, tile) if config.accumulator and tile else None
    state = _Pass(w=w[perm], u=inverse_cholesky_upper(h[np.ix_(perm, perm)], config.percdamp), perm=perm,
                  srows=srows[perm], config=config, codes=np.zeros((k, n), dtype=np.int8), axe=axe,
                  block_scales=s.copy() if recompute else None, importance=importance[perm])
    state.run()
    codes = np.empty_like(state.codes)
    codes[perm] = state.codes
    out_scales = state.block_scales if state.block_scales is not None else s
    return QuantizedWeight(values=codes, scales=out_scales, bits=config.bits, block=config.block)


__all__ = ["ScaleMethod", "inverse_cholesky_upper", "optq"]
