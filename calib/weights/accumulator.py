"""Weight quantization stage: integer accumulator bounds (the arithmetic behind AXE and the overflow verifier).

One output channel of an integer GEMM accumulates y = sum_k q_k * x_k with integer weights q_k and N-bit integer
inputs x_k in [x_min, x_max] (signed [-2**(N-1), 2**(N-1) - 1] or unsigned [0, 2**N - 1]; the full range, as
brevitas assumes when the input quantizer's narrowness is unknown). Over all inputs in range the extremes are

    max_x y = x_max * P + x_min * Neg        P   = sum of the positive q_k  (>= 0)
    min_x y = x_min * P + x_max * Neg        Neg = sum of the negative q_k  (<= 0)

(each term is maximised independently: x_k = x_max where q_k > 0, x_min where q_k < 0). Any partial sum over a
subset of the terms lies between the subset's own extremes, which lie inside these, so a bound on the whole
dot product also bounds every accumulation order. With multi-stage accumulation K is split into tiles of T
consecutive inputs, each summed in its own P-bit accumulator (Colbert et al. 2024, arXiv 2409.17092,
"multi-stage accumulation"); the bounds are then per (tile, channel).

A signed P-bit two's-complement accumulator holds [-2**(P-1), 2**(P-1) - 1]; AXE keeps every tile inside the
symmetric [-A, A], A = 2**(P-1) - 1 (sign-magnitude safe, as brevitas does).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from calib.errors import ConfigError
from calib.schema import Schema
from calib.weights.grid import check_bits, qmax

I64 = npt.NDArray[np.int64]
MAX_ACCUMULATOR_BITS = 64
MAX_ACTIVATION_BITS = 16


def input_range(activation_bits: int, signed: bool) -> tuple[int, int]:
    """(x_min, x_max) of full-range N-bit integers: signed [-2**(N-1), 2**(N-1)-1], unsigned [0, 2**N-1]."""
    if isinstance(activation_bits, bool) or not 1 <= activation_bits <= MAX_ACTIVATION_BITS:
        raise ConfigError(f"activation bits {activation_bits!r} not supported; allowed 1..{MAX_ACTIVATION_BITS}")
    if signed:
        return -(2 ** (activation_bits - 1)), 2 ** (activation_bits - 1) - 1
    return 0, 2**activation_bits - 1


def check_accumulator_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_ACCUMULATOR_BITS:
        raise ConfigError(f"accumulator bits {bits!r} not supported; allowed 2..{MAX_ACCUMULATOR_BITS}")


def symmetric_limit(accumulator_bits: int) -> int:
    """A = 2**(P-1) - 1: AXE keeps every partial sum in [-A, A]."""
    check_accumulator_bits(accumulator_bits)
    return int(2 ** (accumulator_bits - 1) - 1)


def twos_complement_range(accumulator_bits: int) -> tuple[int, int]:
    """[-2**(P-1), 2**(P-1) - 1]: what a signed P-bit register holds."""
    check_accumulator_bits(accumulator_bits)
    return -(2 ** (accumulator_bits - 1)), 2 ** (accumulator_bits - 1) - 1


def bits_to_hold(low: int, high: int) -> int:
    """Smallest P whose two's-complement range [-2**(P-1), 2**(P-1)-1] holds [low, high] (at least 2)."""
    bits = 2
    while not (-(2 ** (bits - 1)) <= low and high <= 2 ** (bits - 1) - 1):
        bits += 1
    return bits


def min_accumulator_bits(weight_bits: int, activation_bits: int, signed: bool) -> int:
    """Smallest P whose symmetric limit A holds one full-range product qmax(M) * max|x| (a one-element dot product).

    Below it even a single weight of the grid's largest magnitude can overflow: the target is rejected.
    """
    x_min, x_max = input_range(activation_bits, signed)
    product = qmax(weight_bits) * max(-x_min, x_max)
    return max(bits_to_hold(-product, product), 3)


def data_type_bound(k: int, weight_bits: int, activation_bits: int, signed: bool) -> int:
    """P* = ceil(alpha + phi(alpha) + 1), alpha = log2 K + N + M - 1 - [signed x], phi(a) = log2(1 + 2**-a).

    The accumulator width above which no constraint is needed (Colbert et al. 2024, arXiv 2409.17092;
    16 for M = N = 4, K = 128, unsigned inputs, as the brevitas AXE README states).
    """
    alpha = math.log2(k) + activation_bits + weight_bits - 1 - int(signed)
    return math.ceil(alpha + math.log2(1 + 2.0**-alpha) + 1)


def zero_centered_l1_bound(accumulator_bits: int, x_min: int, x_max: int) -> float:
    """AXE's radius Z = (2**P - 2) / (x_max - x_min): with sum(q) = 0 the worst case is (x_max-x_min)||q||_1/2."""
    check_accumulator_bits(accumulator_bits)
    return (2.0**accumulator_bits - 2.0) / float(x_max - x_min)


def tile_starts(k: int, tile: int | None) -> I64:
    """First input index of each tile of T consecutive inputs (the last tile may be shorter); one tile if None."""
    step = k if tile is None else tile
    return np.arange(0, k, step, dtype=np.int64)


def worst_case(values: npt.NDArray[np.integer], x_min: int, x_max: int, tile: int | None) -> tuple[I64, I64]:
    """(max, min) over all inputs in [x_min, x_max] of each tile's integer dot product, int64 [tiles, N] each.

    ``values`` is an integer weight [K, N] (reduction over axis 0).
    """
    q = np.asarray(values).astype(np.int64)
    starts = tile_starts(q.shape[0], tile)
    positive = np.add.reduceat(np.where(q > 0, q, 0), starts, axis=0)
    negative = np.add.reduceat(np.where(q < 0, q, 0), starts, axis=0)
    return x_max * positive + x_min * negative, x_min * positive + x_max * negative


class AccumulatorTarget(Schema, frozen=True):
    """AXE target: a signed P-bit accumulator per tile of T inputs, for N-bit (signed or unsigned) activations.

    ``soft``: also apply the soft L1 projection (Duchi et al. 2008) before the strict running clamp; the clamp
    alone guarantees no overflow.
    """

    accumulator_bits: int
    activation_bits: int = 8
    signed_inputs: bool = True
    tile: int | None = None
    soft: bool = True

    def __post_init__(self) -> None:
        check_accumulator_bits(self.accumulator_bits)
        input_range(self.activation_bits, self.signed_inputs)
        if self.tile is not None and (isinstance(self.tile, bool) or self.tile < 1):
            raise ConfigError(f"accumulator tile {self.tile!r} must be a positive int (or None for one tile)")

    @property
    def x_range(self) -> tuple[int, int]:
        return input_range(self.activation_bits, self.signed_inputs)

    @property
    def limit(self) -> int:
        return symmetric_limit(self.accumulator_bits)


def check_target(target: AccumulatorTarget, k: int, weight_bits: int, block: int | None) -> int:
    """Validate a target against a [K, N] weight of ``weight_bits`` (per block B or per channel); returns T.

    Errors (ConfigError): P below :func:`min_accumulator_bits`; T larger than K; with per-block scales a tile
    that straddles two blocks (T must divide B: an integer accumulator cannot mix two scales).
    """
    check_bits(weight_bits)
    needed = min_accumulator_bits(weight_bits, target.activation_bits, target.signed_inputs)
    if target.accumulator_bits < needed:
        x_min, x_max = target.x_range
        raise ConfigError(
            f"accumulator bits {target.accumulator_bits} cannot hold even a one-element dot product of a "
            f"{weight_bits}-bit weight ({qmax(weight_bits)}) and a {target.activation_bits}-bit "
            f"{'signed' if target.signed_inputs else 'unsigned'} input ({max(-x_min, x_max)}); need at least {needed}")
    tile = k if target.tile is None else target.tile
    if tile > k:
        raise ConfigError(f"accumulator tile {tile} is larger than K={k}; allowed 1..{k}")
    if block is not None and (target.tile is None or block % tile):
        raise ConfigError(f"per-block scales (block {block}) need an accumulator tile that divides the block "
                          f"(got {target.tile}); e.g. tile={block}")
    return tile
