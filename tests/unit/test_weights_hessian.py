"""Exact accumulator and Hessian observers: merge of shards == one pass bit for bit, in any grouping and order."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.errors import CalibrationError
from calib.exact_sum import ExactSum
from calib.weights.hessian import GpfqObserver, HessianObserver

K = 4
# float32 rows spanning many binades, so that float sums of the products would depend on grouping
wide = st.one_of(st.floats(-1e4, 1e4, width=32), st.floats(-2.0**-10, 2.0**-10, width=32))
batch = arrays(np.float32, st.tuples(st.integers(0, 6), st.just(K)), elements=wide)
batch_lists = st.lists(batch, min_size=1, max_size=6)


def _assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _shards(draw: st.DrawFn, n: int) -> tuple[list[list[int]], list[int]]:
    """A random partition of batch indices 0..n-1 into shards (each shard in a random order) and a merge order."""
    order = draw(st.permutations(list(range(n))))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=3)))
    bounds = [0, *cuts, n]
    shards = [list(order[a:b]) for a, b in itertools.pairwise(bounds) if b > a]
    return shards, draw(st.permutations(list(range(len(shards)))))


@st.composite
def sharded(draw: st.DrawFn) -> tuple[list[np.ndarray], list[list[int]], list[int]]:
    batches = draw(batch_lists)
    shards, merge_order = _shards(draw, len(batches))
    return batches, shards, merge_order


@settings(max_examples=60, deadline=None)
@given(case=sharded())
def test_hessian_shards_merged_in_any_grouping_and_order_equal_one_pass(
        case: tuple[list[np.ndarray], list[list[int]], list[int]]) -> None:
    batches, shards, merge_order = case
    one = HessianObserver(K)
    for rows in batches:
        one.update(rows)
    parts = []
    for shard in shards:
        obs = HessianObserver(K)
        for i in shard:
            obs.update(batches[i])
        parts.append(obs)
    merged = HessianObserver(K)
    for j in merge_order:
        merged.merge(HessianObserver.from_state(parts[j].state()))  # through the checkpoint format too
    _assert_same_state(merged.state(), one.state())
    assert merged.count == one.count == sum(b.shape[0] for b in batches)
    if one.count:
        np.testing.assert_array_equal(merged.matrix(), one.matrix())


@settings(max_examples=40, deadline=None)
@given(case=sharded())
def test_gpfq_shards_merged_in_any_grouping_and_order_equal_one_pass(
        case: tuple[list[np.ndarray], list[list[int]], list[int]]) -> None:
    batches, shards, merge_order = case
    # the "quantized" input of each batch: its rows rounded to a coarse grid (a deterministic function of the batch)
    pairs = [(np.round(b * 4) / 4, b) for b in batches]
    one = GpfqObserver(K)
    for xq, xf in pairs:
        one.update(xq.astype(np.float32), xf)
    merged = GpfqObserver(K)
    for j in merge_order:
        obs = GpfqObserver(K)
        for i in shards[j]:
            obs.update(pairs[i][0].astype(np.float32), pairs[i][1])
        merged.merge(obs)
    _assert_same_state(GpfqObserver.from_state(merged.state()).state(), one.state())


def test_hessian_matrix_is_exact_for_integer_rows() -> None:
    # small integers: every product and every sum is exact, so the result must equal integer arithmetic
    rng = np.random.default_rng(0)
    batches = [rng.integers(-50, 51, size=(n, 6)) for n in (7, 1, 12, 5)]
    obs = HessianObserver(6)
    for b in batches:
        obs.update(b.astype(np.float32))
    rows = np.concatenate(batches).astype(np.int64)
    np.testing.assert_array_equal(obs.gram(), (rows.T @ rows).astype(np.float64))
    np.testing.assert_array_equal(obs.matrix(), (rows.T @ rows).astype(np.float64) * (2.0 / rows.shape[0]))


def test_gpfq_matrices_match_direct_products() -> None:
    rng = np.random.default_rng(1)
    xf = rng.standard_normal((40, 5)).astype(np.float32)
    xq = (np.round(xf * 8) / 8).astype(np.float32)
    obs = GpfqObserver(5)
    obs.update(xq[:15], xf[:15])
    obs.update(xq[15:], xf[15:])
    h, g = obs.matrices()
    xq64, xf64 = xq.astype(np.float64), xf.astype(np.float64)
    np.testing.assert_allclose(h, xq64.T @ xq64 / 40, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(g, xq64.T @ xf64 / 40, rtol=1e-13, atol=1e-15)  # row index: quantized input


def test_exact_sum_is_independent_of_order_where_float_sums_are_not() -> None:
    values = [np.array([1e16]), np.array([1.0]), np.array([-1e16]), np.array([1.0])]
    assert (1e16 + 1.0) - 1e16 + 1.0 != 1e16 - 1e16 + 1.0 + 1.0  # the float witness
    totals = []
    for order in ([0, 1, 2, 3], [0, 2, 1, 3], [3, 2, 1, 0]):
        acc = ExactSum((1,), frac_bits=8)
        for i in order:
            acc.add(values[i])
        totals.append(acc.value()[0])
    assert totals == [2.0, 2.0, 2.0]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**60), 2**60), min_size=1, max_size=20), st.integers(0, 70))
def test_exact_sum_value_is_the_correctly_rounded_total(numerators: list[int], frac_bits: int) -> None:
    # contributions that are exact multiples of the resolution 2**-frac_bits and exact in float64
    values = [math.ldexp(float(n >> 11 << 11), -frac_bits) for n in numerators]
    acc = ExactSum((), frac_bits=frac_bits)
    for v in values:
        acc.add(np.float64(v))
    exact = sum((Fraction(v) for v in values), Fraction(0))
    assert float(acc.value()) == float(exact)


def test_exact_sum_rounds_each_contribution_half_to_even() -> None:
    acc = ExactSum((3,), frac_bits=1)  # resolution 0.5
    acc.add(np.array([0.25, 0.75, -0.25]))  # ties -> even multiples of 0.5: 0.0, 1.0, -0.0
    np.testing.assert_array_equal(acc.value(), [0.0, 1.0, 0.0])


def test_exact_sum_errors() -> None:
    acc = ExactSum((2,), frac_bits=56)
    with pytest.raises(CalibrationError, match="non-finite"):
        acc.add(np.array([1.0, np.nan]))
    with pytest.raises(CalibrationError, match="shape"):
        acc.add(np.zeros(3))
    with pytest.raises(CalibrationError, match="exceeds the accumulator range"):
        acc.add(np.array([1e18, 0.0]))
    big = ExactSum((1,), frac_bits=0)
    big.add(np.array([2.0**114]))
    with pytest.raises(CalibrationError, match="overflow"):
        big.add(np.array([2.0**114]))  # the high limb passes 2**63
    with pytest.raises(CalibrationError, match="frac_bits"):
        acc.merge(ExactSum((2,), frac_bits=40))
    with pytest.raises(CalibrationError, match="low limb"):
        ExactSum.from_state({"hi": np.zeros(2, np.int64), "lo": np.array([-1, 0]), "frac_bits": np.asarray(56)})


def test_hessian_observer_rejects_bad_rows() -> None:
    obs = HessianObserver(3)
    with pytest.raises(CalibrationError, match="float32"):
        obs.update(np.zeros((2, 3)))
    with pytest.raises(CalibrationError, match=r"\[n, 3\]"):
        obs.update(np.zeros((2, 4), np.float32))
    with pytest.raises(CalibrationError, match="NaN"):
        obs.update(np.full((1, 3), np.inf, np.float32))
    with pytest.raises(CalibrationError, match="no rows"):
        obs.matrix()
    with pytest.raises(CalibrationError, match="pair up"):
        GpfqObserver(3).update(np.zeros((2, 3), np.float32), np.zeros((1, 3), np.float32))
    with pytest.raises(CalibrationError, match="features"):
        obs.merge(HessianObserver(4))


@settings(max_examples=40, deadline=None)
@given(case=sharded())
def test_first_token_rows_merge_in_any_grouping_and_order_equal_one_pass(
        case: tuple[list[np.ndarray], list[list[int]], list[int]]) -> None:
    batches, shards, merge_order = case

    def fold(obs: HessianObserver, index: int) -> None:
        rows = batches[index]
        obs.update(rows, rows[:2], np.arange(min(2, len(rows)), dtype=np.int64) + 100 * index)

    whole = HessianObserver(K)
    for i in range(len(batches)):
        fold(whole, i)
    parts = []
    for shard in shards:
        obs = HessianObserver(K)
        for i in shard:
            fold(obs, i)
        parts.append(obs)
    merged = HessianObserver(K)
    for j in merge_order:
        merged.merge(HessianObserver.from_state(parts[j].state()))
    _assert_same_state(merged.state(), whole.state())
    assert np.all(np.diff(whole.first_ids) > 0)


def test_first_token_weight_adds_the_first_rows_gram() -> None:
    rows = np.array([[1, 2], [3, -1], [0, 5], [2, 2]], dtype=np.float32)
    obs = HessianObserver(2)
    obs.update(rows[:2], rows[:1], np.array([0]))
    obs.update(rows[2:], rows[2:3], np.array([7]))
    x, x0 = rows.astype(np.float64), rows[[0, 2]].astype(np.float64)
    np.testing.assert_array_equal(obs.matrix(), 2.0 / 4 * (x.T @ x))  # integer rows: exact
    np.testing.assert_array_equal(obs.matrix(16.0), 2.0 / 4 * (x.T @ x + 15.0 * (x0.T @ x0)))
    np.testing.assert_array_equal(obs.matrix(0.0), 2.0 / 4 * (x.T @ x - x0.T @ x0))  # first tokens left out
    with pytest.raises(CalibrationError, match="overlapping"):
        obs.update(rows[:1], rows[:1], np.array([7]))
    with pytest.raises(CalibrationError, match="first-token weight"):
        obs.matrix(-1.0)


def test_statistics_without_first_rows_load_and_refuse_a_first_token_weight() -> None:
    obs = HessianObserver(2)
    obs.update(np.eye(2, dtype=np.float32))
    legacy = {k: v for k, v in obs.state().items() if not k.startswith("first.")}
    loaded = HessianObserver.from_state(legacy)
    np.testing.assert_array_equal(loaded.matrix(), obs.matrix())
    with pytest.raises(CalibrationError, match="collect the Hessians again"):
        loaded.matrix(4.0)
