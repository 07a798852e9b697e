"""The fused fold (calib.fused) gives bit for bit the observer states of the reference NumPy path."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from calib import fold as fold_module
from calib import fused
from calib.errors import CalibrationError
from calib.layout import TensorLayout
from calib.statistics import DEFAULT_KINDS, TensorStatistics

pytestmark = pytest.mark.skipif(not fused.available(), reason="Numba is not installed")

B, S, H, D = 3, 7, 2, 8


def _mask(rng: np.random.Generator, kind: str) -> np.ndarray | None:
    if kind == "none":
        return None
    lengths = rng.integers(1, S + 1, size=B)
    mask = np.arange(S)[None, :] < lengths[:, None]
    if kind == "left":
        mask = mask[:, ::-1]
    if kind == "holes":
        mask = rng.random((B, S)) < 0.6
        mask[:, 0] = True
    return np.ascontiguousarray(mask)


CASES = {  # name: (shape, layout, kinds)
    "hidden": ((B, S, D), TensorLayout(token_axes=(1,)), DEFAULT_KINDS),
    "heads": ((B, H, S, D), TensorLayout(token_axes=(2,)), DEFAULT_KINDS),
    "scores": ((B, H, S, S), TensorLayout(token_axes=(2, -1)), ("minmax", "histogram")),
    "keys": ((B, H, D, S), TensorLayout(token_axes=(-1,)), ("minmax", "tokens", "histogram")),
    "flat": ((B * S, D), TensorLayout(flattened=True), ("minmax", "dims", "histogram")),
    "pooled": ((B, D), TensorLayout(), ("minmax", "dims", "histogram")),
}


def _fold_all(case: str, batches: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]], use_fused: bool,
              monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    _, layout, kinds = CASES[case]
    monkeypatch.setattr(fold_module, "FUSED", use_fused)
    stats = TensorStatistics.create("t", kinds, bins=256)
    for index, (x, mask, ids) in enumerate(batches):
        fold_module.observe(stats, layout, x, mask, ids, batch=index)
    return stats.state()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("padding", ["none", "right", "left", "holes"])
def test_fused_states_equal_the_reference_bit_for_bit(case: str, padding: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{case}-{padding}".encode()))
    shape = CASES[case][0]
    batches = []
    for index, scale in enumerate([1.0, 0.5, 4.0, 1.0, 1e-3, 300.0]):  # the grid widens at batches 2 and 5
        x = (rng.standard_t(3, size=shape) * scale).astype(np.float32)
        x[x > 2.0 * scale] = np.float32(math.ldexp(1.0, -3))  # values on bin edges
        if index == 3:
            x[..., 0] = 0.0  # exact zeros
        batches.append((x, _mask(rng, padding), rng.integers(0, 50, size=(B, S))))
    fused_state = _fold_all(case, batches, True, monkeypatch)
    reference = _fold_all(case, batches, False, monkeypatch)
    assert fused_state.keys() == reference.keys()
    for key, value in reference.items():
        np.testing.assert_array_equal(fused_state[key], value, err_msg=key)
        assert fused_state[key].dtype == value.dtype, key


def test_histogram_counts_equal_a_direct_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Independent of both paths: ceil(|x| / width) - 1 counted with np.bincount over the valid values."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, S, D)).astype(np.float32)
    mask = _mask(rng, "right")
    assert mask is not None
    monkeypatch.setattr(fold_module, "FUSED", True)
    stats = TensorStatistics.create("t", ("minmax", "histogram"), bins=256)
    fold_module.observe(stats, TensorLayout(token_axes=(1,)), x, mask, None, batch=0)
    hist = stats.get("histogram").histogram
    valid = np.abs(x[mask].astype(np.float64)).ravel()
    index = np.maximum(np.ceil(valid / hist.bin_width).astype(np.int64) - 1, 0)
    np.testing.assert_array_equal(hist.counts, np.bincount(index, minlength=len(hist.counts)))
    assert stats.minmax.count == valid.size
    assert stats.minmax.maximum == float(x[mask].max()) and stats.minmax.minimum == float(x[mask].min())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_are_named_as_by_the_reference(bad: float, monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.ones((B, S, D), dtype=np.float32)
    x[1, 2, 3] = bad
    monkeypatch.setattr(fold_module, "FUSED", True)
    stats = TensorStatistics.create("t", DEFAULT_KINDS, bins=256)
    with pytest.raises(CalibrationError, match=r"tensor 't' has \d+ NaN and \d+ \+inf values in calibration batch 4"):
        fold_module.observe(stats, TensorLayout(token_axes=(1,)), x, np.ones((B, S), dtype=bool), None, batch=4)


def test_mask_sentinels_are_excluded_and_counted_like_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, H, S, S)).astype(np.float32)
    x[0, :, :, -1] = -np.inf
    x[1, :, :, -2] = np.float32(-3.0e38)
    mask = np.ones((B, S), dtype=bool)
    states = []
    for use_fused in (True, False):
        monkeypatch.setattr(fold_module, "FUSED", use_fused)
        stats = TensorStatistics.create("t", ("minmax", "histogram"), bins=256)
        fold_module.observe(stats, TensorLayout(token_axes=(2, -1)), x, mask, None, batch=0)
        assert stats.mask_values == 2 * H * S
        states.append(stats.state())
    for key, value in states[1].items():
        np.testing.assert_array_equal(states[0][key], value, err_msg=key)


def test_without_numba_the_reference_path_folds_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import sys

    import calib

    monkeypatch.setattr(fused, "_kernels", {})
    monkeypatch.setattr(fused, "_unusable", [])
    monkeypatch.setitem(sys.modules, "calib.fused_kernels", None)  # import raises ImportError
    monkeypatch.delattr(calib, "fused_kernels", raising=False)
    monkeypatch.setattr(fold_module, "FUSED", True)
    x = np.random.default_rng(7).standard_normal((B, S, D)).astype(np.float32)
    stats = TensorStatistics.create("t", ("minmax", "histogram"), bins=256)
    with caplog.at_level("WARNING", logger="calib.fused"):
        fold_module.observe(stats, TensorLayout(token_axes=(1,)), x, np.ones((B, S), dtype=bool), None, batch=0)
    assert "Numba cannot be imported" in caplog.text
    assert stats.minmax.count == x.size and stats.minmax.maximum == float(x.max())
    assert int(stats.get("histogram").histogram.counts.sum()) == x.size
