"""TensorRT entropy calibration (EntropyCalibration2) against a straightforward re-implementation.

The reference below transcribes pytorch-quantization's ``_compute_amax_entropy`` loop (digitize into 128
levels, expand over non-empty bins, clipped mass on the last bin, scipy's KL, last minimum wins); it shares
no code with ``calib.methods``.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import entropy as scipy_entropy

from calib.histogram import AbsHistogram
from calib.methods import amax_entropy, entropy_bin, entropy_divergences


def reference_entropy_bin(hist: np.ndarray, num_bits: int = 8, start_bin: int = 128) -> int:
    bins = np.array(hist, dtype=np.float64)
    bins[0] = bins[1]
    nbins = 1 << (num_bits - 1)
    divergences, arguments = [], []
    for i in range(start_bin, len(bins) + 1):
        space = np.linspace(0, i, num=nbins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        used = digitized != -1
        level_sums = np.bincount(digitized[used], weights=bins[:i][used], minlength=nbins)
        level_sizes = np.bincount(digitized[used], minlength=nbins)  # collections.Counter in the original
        new_density_counts = level_sums / np.maximum(level_sizes, 1)
        new_density = np.where(used, new_density_counts[np.maximum(digitized, 0)], 0.0)
        reference_density = np.array(bins[:i])
        reference_density[-1] += np.sum(bins[i:])
        if new_density.sum() == 0:  # no quantized distribution at all: KL undefined, never chosen
            divergences.append(np.inf)
        else:
            divergences.append(scipy_entropy(reference_density, new_density))
        arguments.append(i)
    divergences_arr = np.array(divergences)
    last_argmin = len(divergences_arr) - 1 - int(np.argmin(divergences_arr[::-1]))
    return arguments[last_argmin]


def _histogram(values: np.ndarray) -> AbsHistogram:
    hist = AbsHistogram()
    hist.update(np.abs(values).astype(np.float32))
    return hist


def _samples(kind: str) -> np.ndarray:
    rng = np.random.default_rng(1234)
    n = 200_000
    if kind == "gaussian":
        return rng.standard_normal(n)
    if kind == "laplace":
        return rng.laplace(size=n)
    if kind == "heavy_tailed":
        return rng.standard_t(df=2, size=n)
    if kind == "bimodal":
        return np.concatenate([rng.normal(0, 1.0, n // 2), rng.normal(5, 0.6, n // 2)])
    if kind == "one_sided":
        return np.maximum(rng.standard_normal(n), 0.0) + rng.exponential(0.2, n) * (rng.random(n) < 0.1)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "heavy_tailed", "bimodal", "one_sided"])
def test_entropy_matches_reference_to_the_bin(kind: str) -> None:
    hist = _histogram(_samples(kind))
    expected = reference_entropy_bin(hist.counts)
    assert entropy_bin(hist.counts) == expected
    assert amax_entropy(hist.counts, hist.bin_width) == expected * hist.bin_width


def test_entropy_on_grown_histogram_matches_reference() -> None:
    rng = np.random.default_rng(7)
    hist = AbsHistogram()
    hist.update(np.abs(rng.standard_normal(50_000)).astype(np.float32))
    hist.update(np.abs(rng.standard_normal(50_000) * 1.3).astype(np.float32))  # grows the range
    assert len(hist.counts) > 2048
    assert entropy_bin(hist.counts) == reference_entropy_bin(hist.counts)


def test_divergences_match_scipy_per_candidate() -> None:
    counts = _histogram(_samples("laplace")).counts
    candidates, kl = entropy_divergences(counts)
    bins = counts.astype(np.float64)
    bins[0] = bins[1]
    for i in (128, 300, 1000, 2048):
        space = np.linspace(0, i, 129)
        digitized = np.digitize(range(i), space) - 1
        nz = bins[:i] > 0
        q = np.zeros(i)
        for level in range(128):
            members = (digitized == level) & nz
            q[members] = bins[:i][members].sum() / max(members.sum(), 1)
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        expected = scipy_entropy(p, q)
        got = kl[list(candidates).index(i)]
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_empty_region_near_zero_is_never_an_undefined_choice() -> None:
    # |x| far from zero: thresholds below the first non-empty bin have no Q at all (treated as infinite)
    hist = _histogram(np.random.default_rng(3).normal(4.0, 0.5, 50_000))
    candidates, kl = entropy_divergences(hist.counts)
    first = int(np.nonzero(hist.counts)[0][0])
    assert np.all(np.isinf(kl[candidates <= first]))
    assert entropy_bin(hist.counts) == reference_entropy_bin(hist.counts)


def test_clipping_into_an_empty_bin_is_infinite() -> None:
    counts = np.zeros(300, dtype=np.int64)
    counts[:100] = 50
    counts[299] = 5  # gap: every threshold in (100, 299) clips mass onto an empty bin
    candidates, kl = entropy_divergences(counts)
    gap = (candidates > 100) & (candidates < 300)
    assert np.all(np.isinf(kl[gap]))
    assert entropy_bin(counts) == reference_entropy_bin(counts)
