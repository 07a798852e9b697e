"""The TensorRT-style |x| histogram: binning, range growth, exact merge (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.histogram import AbsHistogram

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
batches = arrays(np.float32, st.integers(1, 300), elements=finite)


def _reference_counts(values: np.ndarray, width: float, n: int) -> np.ndarray:
    """Bin j holds w*j <= |x| < w*(j+1) (float32 scaling as the implementation's grid; float64 where 1/w would
    overflow float32, as for a batch of denormals), top edge in the last bin."""
    inverse = 1.0 / width
    if inverse < 1e30:
        scaled = np.abs(values).astype(np.float32) * np.float32(inverse)
    else:
        scaled = np.abs(values).astype(np.float64) * inverse
    index = np.floor(scaled).astype(np.int64)
    return np.bincount(np.minimum(index, n - 1), minlength=n)


def test_first_batch_fixes_width_and_later_batches_grow_the_range() -> None:
    hist = AbsHistogram(num_bins=2048)
    first = np.array([0.5, -2.0, 1.0], dtype=np.float32)
    hist.update(np.abs(first))
    assert hist.bin_width == 2.0 / 2048
    assert len(hist.counts) == 2048 and hist.counts[-1] == 1
    hist.update(np.abs(np.array([-3.0], dtype=np.float32)))
    assert hist.bin_width == 2.0 / 2048  # width kept
    assert len(hist.counts) == math.ceil(3.0 / (2.0 / 2048)) == 3072
    assert hist.total == 4
    np.testing.assert_array_equal(hist.edges[:3], np.array([0.0, 1, 2]) * (2.0 / 2048))


def test_zeros_before_the_first_nonzero_value_land_in_bin_zero() -> None:
    hist = AbsHistogram(num_bins=128)
    hist.update(np.zeros(5, dtype=np.float32))
    assert hist.bin_width == 0.0 and hist.total == 5
    hist.update(np.array([1.0], dtype=np.float32))
    assert hist.counts[0] == 5 and hist.counts[-1] == 1 and hist.total == 6


@settings(max_examples=40, deadline=None)
@given(a=batches, b=batches)
def test_merge_equals_one_pass(a: np.ndarray, b: np.ndarray) -> None:
    width = float(max(np.abs(a).max(), np.abs(b).max(), 1e-3)) / 256  # one fixed grid for all three
    one_pass = AbsHistogram(bin_width=width)
    one_pass.update(np.abs(a))
    one_pass.update(np.abs(b))
    left, right = AbsHistogram(bin_width=width), AbsHistogram(bin_width=width)
    left.update(np.abs(a))
    right.update(np.abs(b))
    merged = left.merge(right)
    np.testing.assert_array_equal(merged.counts, one_pass.counts)
    assert merged.total == a.size + b.size
    concatenated = AbsHistogram(bin_width=width)
    concatenated.update(np.abs(np.concatenate([a, b])))
    np.testing.assert_array_equal(concatenated.counts, one_pass.counts)


@settings(max_examples=40, deadline=None)
@given(values=batches)
@example(values=np.array([1.11e-41], dtype=np.float32))  # a lone denormal: 1/width overflows float32
def test_binning_matches_reference(values: np.ndarray) -> None:
    hist = AbsHistogram(num_bins=512)
    hist.update(np.abs(values))
    if hist.bin_width == 0.0:
        assert hist.pending_zeros == values.size
        return
    np.testing.assert_array_equal(hist.counts, _reference_counts(values, hist.bin_width, len(hist.counts)))


def test_a_huge_range_jump_coarsens_instead_of_exhausting_memory() -> None:
    hist = AbsHistogram(num_bins=2048)
    hist.update(np.array([1e-6], dtype=np.float32))
    hist.update(np.array([1e4], dtype=np.float32))
    assert len(hist.counts) <= 1 << 20 and hist.total == 2
    assert hist.bin_width > 1e-6 / 2048


def test_merge_of_grids_that_refine_each_other_regroups_bins() -> None:
    values = np.abs(np.random.default_rng(1).standard_normal(500)).astype(np.float32)
    fine, coarse = AbsHistogram(bin_width=0.01), AbsHistogram(bin_width=0.04)
    fine.update(values.copy())
    coarse.update(values.copy())
    merged = AbsHistogram(bin_width=0.01)
    merged.update(values.copy())
    merged.merge(coarse)
    assert merged.bin_width == 0.04 and merged.total == 1000
    regrouped = np.add.reduceat(np.pad(fine.counts, (0, (-len(fine.counts)) % 4)), np.arange(0, len(fine.counts), 4))
    np.testing.assert_array_equal(merged.counts[: len(regrouped)] - coarse.counts[: len(regrouped)],
                                  regrouped[: len(merged.counts)])


def test_state_round_trip_is_exact() -> None:
    hist = AbsHistogram()
    hist.update(np.abs(np.random.default_rng(0).standard_normal(1000)).astype(np.float32))
    again = AbsHistogram.from_state(hist.state())
    np.testing.assert_array_equal(again.counts, hist.counts)
    assert again.bin_width == hist.bin_width and again.num_bins == hist.num_bins
