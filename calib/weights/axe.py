"""Weight quantization stage: AXE, the accumulator-aware constraint plugged into OPTQ and GPFQ.

Colbert, Grob, Franco, Zhang, Saab 2024, "Accumulator-Aware Post-Training Quantization", arXiv 2409.17092,
as implemented in brevitas v0.12.1 (``src/brevitas_examples/common/axe.py``, class ``_AXE``). Per output
channel c and tile j of T inputs (a P-bit accumulator each), in integer units (weight / scale):

soft global constraint, once per layer (skipped when ``soft`` is off):
    v = w[tile, c] / s - mean(w[tile, c] / s)                        zero-centred, so the radius Z applies
    theta[j, c] = Duchi soft threshold of |v| for the L1 ball of radius Z = (2**P - 2) / (x_max - x_min)
    each greedy argument w is shrunk:  w <- sign(w) * max(|w| - s * theta, 0)

strict local constraint, at every step (guarantees no overflow for any input in range):
    p, n = running sums of the positive / negative integer weights already chosen in (j, c)
    invariants  x_max * p + x_min * n <= A  and  x_min * p + x_max * n >= -A,   A = 2**(P-1) - 1
    u = min((A - x_max p - x_min n) / x_max, (-A - x_min p - x_max n) / x_min) - 0.5  (second term: signed x)
    l = max((-A - x_min p - x_max n) / x_max, (A - x_max p - x_min n) / x_min) + 0.5  (second term: signed x)
    the argument is clamped to [s * min(l, 0), s * max(u, 0)] and rounded to nearest: the +-0.5 margins
    absorb the rounding, so the new weight keeps both invariants.

Differences from brevitas, deliberate: the last, shorter tile is centred over its own inputs (brevitas pads it
with zeros before taking the mean); the invariants are checked in exact integers after every step.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from calib.errors import InternalError
from calib.weights.accumulator import AccumulatorTarget, tile_starts, zero_centered_l1_bound

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def l1_ball_threshold(magnitudes: npt.NDArray[np.floating], radius: float) -> F64:
    """Per column of non-negative ``magnitudes`` [L, N]: the soft threshold theta that projects onto the L1 ball.

    Duchi, Shalev-Shwartz, Singer, Chandra 2008 (ICML, "Efficient projections onto the l1-ball for learning in
    high dimensions", figure 1): u = sort descending, c_j = u_1 + ... + u_j, rho = largest j with
    j * u_j > c_j - radius, theta = (c_rho - radius) / rho; theta = 0 when the column is already inside the ball.
    """
    if radius <= 0:
        raise InternalError(f"L1 ball radius {radius} must be positive")
    v = np.asarray(magnitudes, dtype=np.float64)
    u = -np.sort(-v, axis=0)
    c = np.cumsum(u, axis=0)
    j = np.arange(1, v.shape[0] + 1, dtype=np.float64)[:, None]
    feasible = u * j > c - radius  # always true at j = 1 (radius > 0); true on a prefix of j
    rho = v.shape[0] - 1 - np.argmax(feasible[::-1], axis=0)  # last true index per column
    cols = np.arange(v.shape[1])
    theta = (c[rho, cols] - radius) / (rho + 1)
    out: F64 = np.where(c[-1] <= radius, 0.0, theta)
    return out


class AxeConstraint:
    """The per-layer AXE state: soft thresholds and the running (p, n) sums per (tile, channel)."""

    def __init__(self, target: AccumulatorTarget, weight: F64, scales: F64, tile: int) -> None:
        """``weight`` [K, N] float (original input order), ``scales`` [K, N] per-element scales, ``tile`` T."""
        k, n = weight.shape
        self.target = target
        self.tile = tile
        self.x_min, self.x_max = target.x_range
        self.limit = target.limit
        tiles = len(tile_starts(k, tile))
        self.positive = np.zeros((tiles, n), dtype=np.int64)
        self.negative = np.zeros((tiles, n), dtype=np.int64)
        self.thresholds = np.zeros((tiles, n), dtype=np.float64)  # integer units
        if target.soft:
            radius = zero_centered_l1_bound(target.accumulator_bits, self.x_min, self.x_max)
            units = weight / scales
            for j, start in enumerate(tile_starts(k, tile)):
                v = units[start:start + tile]
                self.thresholds[j] = l1_ball_threshold(np.abs(v - v.mean(axis=0)), radius)

    def limits(self, tile: int) -> tuple[F64, F64]:
        """(lower, upper) in integer units for the next weight of every channel in ``tile`` (margins applied)."""
        p = self.positive[tile].astype(np.float64)
        n = self.negative[tile].astype(np.float64)
        a, x_min, x_max = float(self.limit), float(self.x_min), float(self.x_max)
        upper = (a - x_max * p - x_min * n) / x_max
        lower = (-a - x_min * p - x_max * n) / x_max
        if self.x_min < 0:  # signed inputs: the other side of each invariant also limits the step
            upper = np.minimum(upper, (-a - x_min * p - x_max * n) / x_min)
            lower = np.maximum(lower, (a - x_max * p - x_min * n) / x_min)
        return np.minimum(lower + 0.5, 0.0), np.maximum(upper - 0.5, 0.0)

    def constrain(self, row: int, argument: F64, scale: F64) -> F64:
        """The AXE-constrained argument for input ``row`` (original index) of every channel, in float units."""
        tile = row // self.tile
        out = argument
        if self.target.soft:
            out = np.sign(out) * np.maximum(np.abs(out) - self.thresholds[tile] * scale, 0.0)
        lower, upper = self.limits(tile)
        clamped: F64 = np.clip(out, scale * lower, scale * upper)
        return clamped

    def record(self, row: int, codes: npt.NDArray[np.integer]) -> None:
        """Add the chosen integer weights of input ``row`` to the running sums; check both invariants exactly."""
        tile = row // self.tile
        q = np.asarray(codes).astype(np.int64)
        self.positive[tile] += np.where(q > 0, q, 0)
        self.negative[tile] += np.where(q < 0, q, 0)
        high = self.x_max * self.positive[tile] + self.x_min * self.negative[tile]
        low = self.x_min * self.positive[tile] + self.x_max * self.negative[tile]
        if np.any(high > self.limit) or np.any(low < -self.limit):
            raise InternalError(f"AXE invariant broken at input {row} (tile {tile}): worst case "
                                f"[{int(low.min())}, {int(high.max())}] outside +-{self.limit}")
