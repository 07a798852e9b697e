"""Range methods: max, percentile (monotone, against sorted values), MSE (against brute force), PEG groups."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.errors import CalibrationError, ConfigError
from calib.histogram import AbsHistogram
from calib.methods import amax_max, amax_mse, amax_percentile


def _hist(values: np.ndarray, bins: int = 2048) -> AbsHistogram:
    hist = AbsHistogram(bins=bins)
    hist.update(np.abs(values).astype(np.float32))
    return hist


def test_max_is_the_larger_magnitude() -> None:
    assert amax_max(-3.5, 2.0) == 3.5
    with pytest.raises(CalibrationError, match="all zero"):
        amax_max(0.0, 0.0)


def test_percentile_is_the_upper_edge_of_the_bin_holding_the_order_statistic() -> None:
    values = np.random.default_rng(0).laplace(size=100_000).astype(np.float32)
    hist = _hist(values)
    absmax = float(np.abs(values).max())
    for p in (99.0, 99.9, 99.99, 99.999):
        ordered = np.sort(np.abs(values))
        kth = ordered[math.ceil(p / 100 * values.size) - 1]  # smallest value with CDF >= p
        bin_index = math.ceil(float(kth) / hist.bin_width) - 1
        expected = min((bin_index + 1) * hist.bin_width, absmax)
        assert amax_percentile(hist.counts, hist.bin_width, p, absmax) == pytest.approx(expected, rel=1e-12)
    assert amax_percentile(hist.counts, hist.bin_width, 100.0, absmax) == absmax


@settings(max_examples=60, deadline=None)
@given(values=arrays(np.float32, st.integers(1, 400), elements=st.floats(-50, 50, width=32)),
       p1=st.floats(0.001, 100.0), p2=st.floats(0.001, 100.0))
def test_percentile_is_monotone(values: np.ndarray, p1: float, p2: float) -> None:
    hist = _hist(values, bins=256)
    absmax = float(np.abs(values).max())
    if absmax == 0.0:
        return
    lo, hi = sorted((p1, p2))
    assert amax_percentile(hist.counts, hist.bin_width, lo, absmax) <= amax_percentile(
        hist.counts, hist.bin_width, hi, absmax)


def test_percentile_rejects_out_of_range_values() -> None:
    with pytest.raises(ConfigError, match=r"99\.99"):
        amax_percentile(np.ones(10, dtype=np.int64), 0.1, 100.5, 1.0)


def test_mse_matches_brute_force_over_bin_centres() -> None:
    values = np.random.default_rng(2).standard_t(3, size=20_000).astype(np.float32)
    hist = _hist(values, bins=512)
    centres = (np.arange(len(hist.counts)) + 0.5) * hist.bin_width
    best, best_err = None, math.inf
    for i in range(128, len(centres)):
        amax = centres[i]
        scale = amax / 127.0
        err = 0.0
        for c, n in zip(centres, hist.counts, strict=True):
            if n:
                err += n * (min(round(c / scale), 127) * scale - c) ** 2  # Python round: half to even
        if err < best_err:
            best, best_err = amax, err
    assert amax_mse(hist.counts, hist.bin_width) == pytest.approx(best, rel=1e-12)


def test_mse_clips_a_laplace_tail_near_the_known_optimum() -> None:
    # 8-bit MSE-optimal clipping of Laplace(b=1) is about 9.9 b (Banner et al. 2019); the sample max is ~12
    values = np.random.default_rng(3).laplace(size=200_000).astype(np.float32)
    hist = _hist(values)
    amax = amax_mse(hist.counts, hist.bin_width)
    assert 8.0 < amax < 11.5 < float(np.abs(values).max())
