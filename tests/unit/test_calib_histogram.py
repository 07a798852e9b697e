"""The |x| histogram on a declared power-of-two grid: binning, coarsening, exact merge (hypothesis)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.errors import CalibrationError, ConfigError
from calib.histogram import AbsHistogram, fit_exponent

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
batches = arrays(np.float32, st.integers(1, 300), elements=finite)


def _exact_bin(value: float, exponent: int) -> int:
    """ceil(|x| / 2**e) - 1 in exact rational arithmetic (zeros in bin 0): written apart from calib.histogram."""
    scaled = Fraction(abs(float(value))) / Fraction(2) ** exponent
    return max(math.ceil(scaled) - 1, 0)


def _reference(values: np.ndarray, bins: int) -> tuple[int | None, list[int]]:
    top = float(np.abs(values).max())
    if top == 0.0:
        return None, []
    e = min(e for e in range(-200, 200) if math.ceil(Fraction(top) / Fraction(2) ** e) <= bins)
    counts = [0] * (max(_exact_bin(v, e) for v in values) + 1)
    for v in values:
        counts[_exact_bin(v, e)] += 1
    return e, counts


@settings(max_examples=60, deadline=None)
@given(values=batches)
@example(values=np.array([1.11e-41], dtype=np.float32))  # a lone denormal: 2**-e is not a float32
@example(values=np.array([0.0, 0.0, 3.0], dtype=np.float32))
def test_binning_matches_exact_arithmetic(values: np.ndarray) -> None:
    hist = AbsHistogram(bins=256)
    hist.update(np.abs(values))
    exponent, counts = _reference(values, 256)
    if exponent is None:
        assert hist.exponent is None and hist.pending_zeros == values.size
        return
    assert hist.exponent == exponent and hist.bin_width == 2.0**exponent
    np.testing.assert_array_equal(hist.counts, counts)
    assert len(hist.counts) <= 256


def test_width_is_the_smallest_power_of_two_that_fits() -> None:
    assert fit_exponent(1.0, 4096) == -12 and fit_exponent(4096.0, 4096) == 0 and fit_exponent(4097.0, 4096) == 1
    hist = AbsHistogram(bins=2048)
    hist.update(np.array([0.5, 2.0, 1.0], dtype=np.float32))
    assert hist.bin_width == 2.0**-10 and len(hist.counts) == 2048 and hist.counts[-1] == 1
    hist.update(np.array([3.0], dtype=np.float32))  # 3 needs width 2**-9: every pair of bins merges
    assert hist.bin_width == 2.0**-9 and hist.total == 4
    assert hist.counts[math.ceil(3.0 / 2.0**-9) - 1] == 1 and hist.counts[1023] == 1


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(batches, min_size=1, max_size=5), data=st.data())
def test_shards_merged_in_any_grouping_equal_one_pass(parts: list[np.ndarray], data: st.DataObject) -> None:
    one_pass = AbsHistogram(bins=512)
    for part in parts:
        one_pass.update(np.abs(part))
    order = data.draw(st.permutations(range(len(parts))))
    split = data.draw(st.integers(0, len(parts)))
    left, right = AbsHistogram(bins=512), AbsHistogram(bins=512)
    for i in order[:split]:
        left.update(np.abs(parts[i]))
    for i in order[split:]:
        right.update(np.abs(parts[i]))
    merged = right.merge(left) if data.draw(st.booleans()) else left.merge(right)
    for key, value in one_pass.state().items():
        np.testing.assert_array_equal(merged.state()[key], value, err_msg=key)


def test_zeros_before_the_first_nonzero_value_land_in_bin_zero() -> None:
    hist = AbsHistogram(bins=128)
    hist.update(np.zeros(5, dtype=np.float32))
    assert hist.bin_width == 0.0 and hist.total == 5
    hist.update(np.array([1.0], dtype=np.float32))
    assert hist.counts[0] == 5 and hist.counts[-1] == 1 and hist.total == 6


def test_a_huge_range_jump_coarsens_and_memory_stays_bounded() -> None:
    hist = AbsHistogram(bins=2048)
    hist.update(np.array([1e-6], dtype=np.float32))
    hist.update(np.array([1e30], dtype=np.float32))
    assert len(hist.counts) <= 2048 and hist.total == 2 and hist.counts[0] == 1


def test_state_round_trip_is_exact_and_bad_grids_are_refused() -> None:
    hist = AbsHistogram()
    hist.update(np.abs(np.random.default_rng(0).standard_normal(1000)).astype(np.float32))
    again = AbsHistogram.from_state(hist.state())
    np.testing.assert_array_equal(again.counts, hist.counts)
    assert (again.exponent, again.bins) == (hist.exponent, hist.bins)
    with pytest.raises(ConfigError, match="power of two"):
        AbsHistogram(bins=1000)
    with pytest.raises(CalibrationError, match="declared with 4096 and 2048"):
        hist.merge(AbsHistogram(bins=2048))
