"""AXE on OPTQ and GPFQ: the accumulator guarantee on random and worst-sign inputs, the L1 projection, P = 32."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.errors import ConfigError
from calib.weights import (
    AccumulatorTarget,
    GpfqConfig,
    OptqConfig,
    QuantizedWeight,
    data_type_bound,
    gpfq,
    min_accumulator_bits,
    optq,
)
from calib.weights.axe import l1_ball_threshold


def _layer(seed: int, k: int = 96, n: int = 6, rows: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))).astype(np.float32)
    w = (rng.standard_normal((k, n)) + 0.3).astype(np.float32)  # a positive bias makes one side of the bound bind
    xq = (np.round(x * 4) / 4).astype(np.float32)
    return w, x, xq


def _quantize(base: str, w: np.ndarray, x: np.ndarray, xq: np.ndarray, bits: int,
              target: AccumulatorTarget | None) -> QuantizedWeight:
    x64, xq64 = x.astype(np.float64), xq.astype(np.float64)
    if base == "optq":
        return optq(w, 2.0 / len(x) * (xq64.T @ xq64), OptqConfig(bits=bits, accumulator=target))
    return gpfq(w, xq64.T @ xq64, xq64.T @ x64, GpfqConfig(bits=bits, accumulator=target))


def _tile_dot_products(q: np.ndarray, x: np.ndarray, tile: int) -> np.ndarray:
    """Exact int64 dot products of input rows x [m, K] with q [K, N], per tile: [m, tiles, N]."""
    k = q.shape[0]
    return np.stack([x[:, s:s + tile].astype(np.int64) @ q[s:s + tile].astype(np.int64)
                     for s in range(0, k, tile)], axis=1)


def _assert_no_overflow(q: np.ndarray, target: AccumulatorTarget, rng: np.random.Generator) -> None:
    x_min, x_max = target.x_range
    limit = 2 ** (target.accumulator_bits - 1) - 1
    tile = target.tile or q.shape[0]
    random_x = rng.integers(x_min, x_max + 1, size=(300, q.shape[0]))
    assert np.abs(_tile_dot_products(q, random_x, tile)).max() <= limit
    for c in range(q.shape[1]):  # the adversarial inputs: the worst sign pattern for channel c, both directions
        up = np.where(q[:, c] > 0, x_max, x_min)[None, :]
        down = np.where(q[:, c] > 0, x_min, x_max)[None, :]
        assert _tile_dot_products(q[:, [c]], up, tile).max() <= limit
        assert _tile_dot_products(q[:, [c]], down, tile).min() >= -limit


@pytest.mark.parametrize("base", ["optq", "gpfq"])
@pytest.mark.parametrize(("bits", "accumulator_bits", "signed", "tile"),
                         [(4, 12, True, 32), (4, 13, False, None), (8, 16, True, 48), (3, 11, False, 16)])
def test_axe_guarantee_holds_on_random_and_worst_sign_inputs(base: str, bits: int, accumulator_bits: int,
                                                              signed: bool, tile: int | None) -> None:
    w, x, xq = _layer(seed=accumulator_bits)
    target = AccumulatorTarget(accumulator_bits=accumulator_bits, activation_bits=8, signed_inputs=signed, tile=tile)
    got = _quantize(base, w, x, xq, bits, target)
    _assert_no_overflow(got.values, target, np.random.default_rng(0))
    plain = _quantize(base, w, x, xq, bits, None)
    with pytest.raises(AssertionError):  # the same layer without AXE can overflow: the check above can fail
        _assert_no_overflow(plain.values, target, np.random.default_rng(0))


@settings(max_examples=40, deadline=None)
@given(w=arrays(np.float32, st.tuples(st.integers(3, 24), st.integers(1, 3)), elements=st.floats(-4, 4, width=32)),
       slack=st.integers(0, 6), signed=st.booleans(), act_bits=st.integers(2, 8), tile_frac=st.floats(0.1, 1.0),
       soft=st.booleans(), base=st.sampled_from(["optq", "gpfq"]))
def test_axe_guarantee_on_arbitrary_small_layers(w: np.ndarray, slack: int, signed: bool, act_bits: int,
                                                 tile_frac: float, soft: bool, base: str) -> None:
    k = w.shape[0]
    p = min_accumulator_bits(4, act_bits, signed) + slack
    target = AccumulatorTarget(accumulator_bits=p, activation_bits=act_bits, signed_inputs=signed,
                               tile=max(1, int(k * tile_frac)), soft=soft)
    rng = np.random.default_rng(k)
    x = rng.standard_normal((3 * k, k)).astype(np.float32)
    got = _quantize(base, w, x, x, 4, target)
    _assert_no_overflow(got.values, target, rng)


@pytest.mark.parametrize("base", ["optq", "gpfq"])
def test_a_32_bit_accumulator_reproduces_the_unconstrained_result(base: str) -> None:
    w, x, xq = _layer(seed=7, k=160)
    target = AccumulatorTarget(accumulator_bits=32, activation_bits=8, tile=64)
    for bits in (8, 4):
        np.testing.assert_array_equal(_quantize(base, w, x, xq, bits, target).values,
                                      _quantize(base, w, x, xq, bits, None).values)


@settings(max_examples=60, deadline=None)
@given(v=arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 3)), elements=st.floats(-50, 50)),
       radius=st.floats(0.5, 200))
def test_l1_ball_threshold_projects_onto_the_ball(v: np.ndarray, radius: float) -> None:
    theta = l1_ball_threshold(np.abs(v), radius)
    for c in range(v.shape[1]):
        mags = np.abs(v[:, c])
        if mags.sum() <= radius:
            assert theta[c] == 0.0
            continue
        lo, hi = 0.0, float(mags.max())  # bisection on the decreasing sum(max(|v| - t, 0))
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.maximum(mags - mid, 0).sum() > radius else (lo, mid)
        assert abs(theta[c] - lo) <= 1e-9 * max(1.0, lo)
        assert np.maximum(mags - theta[c], 0).sum() == pytest.approx(radius, rel=1e-9)


def test_soft_threshold_shrinks_a_layer_far_outside_the_ball() -> None:
    w, x, xq = _layer(seed=8)
    target = AccumulatorTarget(accumulator_bits=12, activation_bits=8, tile=32)
    soft = _quantize("gpfq", w, x, xq, 4, target).values
    strict = _quantize("gpfq", w, x, xq, 4, target.__class__(accumulator_bits=12, activation_bits=8, tile=32,
                                                                soft=False)).values
    assert np.abs(soft).sum() < np.abs(strict).sum()


def test_bounds() -> None:
    assert data_type_bound(128, 4, 4, signed=False) == 16  # the brevitas AXE README's example
    # at P* even full-range (non-narrow, -2**(M-1)) weights cannot overflow: K * 2**(M-1) * (2**N - 1) <= A
    assert 128 * 8 * 15 <= 2 ** (16 - 1) - 1
    assert min_accumulator_bits(8, 8, signed=True) == 15  # 127 * 128 = 16256 <= 2**14 - 1
    assert min_accumulator_bits(8, 8, signed=False) == 16  # 127 * 255 = 32385
    assert min_accumulator_bits(4, 8, signed=True) == 11  # 7 * 128 = 896 <= 1023


def test_bad_accumulator_targets_are_rejected_before_any_work() -> None:
    w = np.ones((64, 2), np.float32)
    not_pd = -np.eye(64)  # would fail in the Cholesky step, after validation
    with pytest.raises(ConfigError, match="accumulator bits 14 cannot hold even a one-element dot product"):
        OptqConfig(bits=8, accumulator=AccumulatorTarget(accumulator_bits=14))
    with pytest.raises(ConfigError, match="accumulator tile 65 is larger than K=64"):
        optq(w, not_pd, OptqConfig(bits=4, accumulator=AccumulatorTarget(accumulator_bits=16, tile=65)))
    with pytest.raises(ConfigError, match="accumulator tile 65 is larger than K=64"):
        gpfq(w, not_pd, not_pd, GpfqConfig(bits=4, accumulator=AccumulatorTarget(accumulator_bits=16, tile=65)))
    with pytest.raises(ConfigError, match="need an accumulator tile that divides the block"):
        optq(w, np.eye(64), OptqConfig(bits=4, block=32, static_block_scales=True,
                                       accumulator=AccumulatorTarget(accumulator_bits=16, tile=48)))
    with pytest.raises(ConfigError, match="static_block_scales"):
        OptqConfig(bits=4, block=32, accumulator=AccumulatorTarget(accumulator_bits=16, tile=32))
    with pytest.raises(ConfigError, match="accumulator bits 1 not supported"):
        AccumulatorTarget(accumulator_bits=1)
    with pytest.raises(ConfigError, match=r"weight bits 9 not supported; allowed 2\.\.8"):
        GpfqConfig(bits=9)


def test_per_block_scales_with_tiles_inside_blocks_keep_the_guarantee() -> None:
    w, x, xq = _layer(seed=9, k=96)
    target = AccumulatorTarget(accumulator_bits=12, activation_bits=8, tile=16)
    x64 = xq.astype(np.float64)
    got = optq(w, 2.0 / len(x) * (x64.T @ x64),
               OptqConfig(bits=4, block=32, static_block_scales=True, accumulator=target))
    assert got.scales.shape == (3, 6)
    _assert_no_overflow(got.values, target, np.random.default_rng(1))
