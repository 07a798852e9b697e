"""The vSPARQ pair observer: exact merges, exact bounds around the true zero-pair count at any scale."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.errors import CalibrationError
from calib.observers import OBSERVER_KINDS, RowsView
from calib.quant import quantize
from calib.sparq import zero_pair_counts
from calib.sparq_observer import NUM_BINS, SparqPairObserver, bin_index, grid_edges, zero_threshold
from calib.statistics import DEFAULT_KINDS, TensorStatistics

# values concentrated near zero (where the threshold lies), exact zeros, and a few large ones
small = st.one_of(st.just(0.0), st.floats(-0.0625, 0.0625, width=32), st.floats(-30, 30, width=32))
rows_strategy = arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 9)), elements=small)


def _observe(*parts: np.ndarray) -> SparqPairObserver:
    observer = SparqPairObserver()
    for part in parts:
        observer.update(RowsView(part))
    return observer


def test_the_kind_is_registered_and_collected_on_demand() -> None:
    assert OBSERVER_KINDS["sparq_pairs"] is SparqPairObserver
    assert "sparq_pairs" not in DEFAULT_KINDS  # a second pass collects it when a plan needs it
    stats = TensorStatistics.create("t", (*DEFAULT_KINDS, "sparq_pairs"))
    stats.update(np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32))
    assert stats.get("sparq_pairs").pairs == 2


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(rows_strategy, min_size=1, max_size=4), data=st.data())
def test_shards_merged_in_any_grouping_equal_one_pass(parts: list[np.ndarray], data: st.DataObject) -> None:
    widths = {p.shape[1] for p in parts}
    parts = [p[:, : min(widths)] for p in parts]  # one tensor: one last axis
    one = _observe(*parts)
    order = data.draw(st.permutations(range(len(parts))))
    cut = data.draw(st.integers(0, len(parts)))
    merged = _observe(*(parts[i] for i in order[:cut])).merge(_observe(*(parts[i] for i in order[cut:])))
    np.testing.assert_array_equal(merged.counts, one.counts)
    restored = SparqPairObserver.from_state(one.state())
    np.testing.assert_array_equal(restored.counts, one.counts)


@settings(max_examples=80, deadline=None)
@given(rows=rows_strategy, exponent=st.floats(-12.0, 2.0))
def test_bounds_hold_the_exact_count_of_calib_sparq(rows: np.ndarray, exponent: float) -> None:
    """Independent reference: quantize with calib.quant and count pairs with calib.sparq.zero_pair_counts."""
    scale = np.float32(2.0**exponent * 1.37)
    exact = zero_pair_counts(quantize(rows, scale))
    bounds = _observe(rows).zero_pairs(scale)
    assert bounds.pairs == exact.pairs
    assert bounds.low <= exact.with_zero <= bounds.high
    # the bounds differ only by pairs whose smaller |x| lies within one grid bin (2**-8 relative) of T
    a = np.abs(rows.astype(np.float64))
    padded = np.concatenate([a, np.zeros((a.shape[0], a.shape[1] % 2))], axis=1)
    minima = padded.reshape(a.shape[0], -1, 2).min(axis=-1)
    t = float(bounds.threshold)
    assert bounds.high - bounds.low <= int(np.sum(np.abs(minima - t) <= t * 2.0**-7))


def test_bounds_on_realistic_activations_are_tight() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 385)).astype(np.float32)
    x[x < 0] *= 0.04  # a GELU-like one-sided tensor: many codes near zero
    observer = _observe(x[:100], x[100:])
    for amax in (0.5, 2.0, float(np.abs(x).max())):
        scale = np.float32(amax / 127)
        exact = zero_pair_counts(quantize(x, scale)).with_zero
        bounds = observer.zero_pairs(scale)
        assert bounds.low <= exact <= bounds.high
        assert bounds.high - bounds.low <= 0.005 * bounds.pairs
        assert bounds.share == pytest.approx(exact / bounds.pairs, abs=0.003)


def test_zero_threshold_is_the_last_float_that_rounds_to_zero() -> None:
    for scale in (np.float32(1.0), np.float32(0.013), np.float32(3.1e-5), np.float32(7.7), np.float32(1e-38)):
        t = zero_threshold(scale)
        after = np.nextafter(t, np.float32(np.inf), dtype=np.float32)
        assert np.rint(np.float32(t) / scale) == 0, scale
        assert np.rint(np.float32(after) / scale) != 0, scale
    with pytest.raises(CalibrationError, match="positive"):
        zero_threshold(0.0)


def test_mask_sentinels_are_never_zero_and_odd_tails_pair_with_zero() -> None:
    rows = np.array([[-np.inf, 0.0, -np.inf, 5.0, 7.0]], dtype=np.float32)  # pairs (-inf, 0) (-inf, 5) (7, pad)
    view = RowsView(rows, sentinel=np.isneginf(rows))
    observer = SparqPairObserver()
    observer.update(view)
    bounds = observer.zero_pairs(np.float32(1.0))
    assert (bounds.pairs, bounds.low, bounds.high) == (3, 2, 2)


def test_grid_bins_are_intervals_in_value_order() -> None:
    for index in (1, 2, 255, 256, 10_000, NUM_BINS - 2):
        lo, hi = grid_edges(index)
        inside = np.array([lo, np.nextafter(np.float32(hi), np.float32(0), dtype=np.float32)], dtype=np.float32)
        assert list(bin_index(inside)) == [index, index]
        assert bin_index(np.array([hi], dtype=np.float32))[0] == index + 1
        assert hi / lo - 1 <= 2.0**-8 + 1e-12
    assert bin_index(np.array([0.0, 1e-30, 3e38, np.inf], dtype=np.float32)).tolist() == [0, 0, NUM_BINS - 1,
                                                                                           NUM_BINS - 1]


def test_a_bad_state_is_rejected() -> None:
    with pytest.raises(CalibrationError, match="bin"):
        SparqPairObserver.from_state({"bins": np.array([NUM_BINS]), "counts": np.array([1])})
    with pytest.raises(CalibrationError, match="counts"):
        SparqPairObserver.from_state({"bins": np.array([0, 1]), "counts": np.array([1])})
