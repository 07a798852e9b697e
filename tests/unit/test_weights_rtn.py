"""RTN weight quantizer: max and MSE scales per channel and per block, against references written here."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.errors import ConfigError
from calib.weights import QuantizedWeight, RtnConfig, ScaleMethod, max_scales, mse_scales, qmax, rtn


def _reference_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The project's INT8 weight rule, written independently: float64 amax / 127 -> float32, float32 division."""
    amax = np.abs(w).max(axis=0).astype(np.float64)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale


def _weight(k: int = 64, n: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, n)) * rng.uniform(0.01, 1.0, size=n)).astype(np.float32)


def test_rtn_int8_per_channel_equals_the_lowering_rule_bit_for_bit() -> None:
    w = _weight()
    w[:, 3] = 0.0  # a zero channel gets scale 1
    got = rtn(w, RtnConfig(bits=8))
    values, scales = _reference_int8(w)
    np.testing.assert_array_equal(got.values, values)
    np.testing.assert_array_equal(got.scales, scales)
    assert got.scales[3] == 1.0 and got.axis == 1


@pytest.mark.parametrize("bits", range(2, 9))
def test_rtn_per_block_uses_one_scale_per_block_and_channel(bits: int) -> None:
    w = _weight(k=96)
    got = rtn(w, RtnConfig(bits=bits, block=32))
    assert got.scales.shape == (3, 12) and got.axis == 0
    limit = 2 ** (bits - 1) - 1
    for b in range(3):
        rows = w[32 * b:32 * (b + 1)]
        scale = (np.abs(rows).max(axis=0).astype(np.float64) / limit).astype(np.float32)
        np.testing.assert_array_equal(got.scales[b], scale)
        np.testing.assert_array_equal(got.values[32 * b:32 * (b + 1)], np.clip(np.rint(rows / scale), -limit, limit))
    assert np.abs(got.values).max() == limit == qmax(bits)


@settings(max_examples=40, deadline=None)
@given(w=arrays(np.float32, st.tuples(st.sampled_from([8, 16]), st.integers(1, 5)),
                elements=st.floats(-1e3, 1e3, width=32)),
       bits=st.integers(2, 8), block=st.sampled_from([None, 4, 8]))
def test_max_scale_rounding_error_is_at_most_half_a_step(w: np.ndarray, bits: int, block: int | None) -> None:
    q = rtn(w, RtnConfig(bits=bits, block=block))
    step = np.repeat(q.scales, block, axis=0) if block else q.scales[None, :]
    err = np.abs(w.astype(np.float64) - q.values.astype(np.float64) * step.astype(np.float64))
    assert np.all(err <= step.astype(np.float64) * (0.5 + 1e-6))


def test_mse_scales_equal_a_brute_force_search_and_never_lose_to_max() -> None:
    w = _weight(k=48, n=6, seed=3)
    w[0, 0] = 8.0  # an outlier: MSE should clip it
    for bits in (3, 4, 8):
        got = mse_scales(w, bits)
        limit = 2 ** (bits - 1) - 1
        for c in range(w.shape[1]):
            amax = float(np.abs(w[:, c]).max())
            best, best_err = None, np.inf
            for i in range(81):
                s = np.float32(amax * (1 - i / 100) / limit)
                deq = s * np.clip(np.rint(w[:, c] / s), -limit, limit)
                err = float(np.sum((w[:, c].astype(np.float64) - deq) ** 2))
                if err < best_err:
                    best, best_err = s, err
            assert got[c] == best
        max_err = np.sum((w - rtn(w, RtnConfig(bits=bits)).dequantize()) ** 2, axis=0)
        mse_err = np.sum((w - rtn(w, RtnConfig(bits=bits, scale_method=ScaleMethod.MSE)).dequantize()) ** 2, axis=0)
        assert np.all(mse_err <= max_err * (1 + 1e-6))
    assert mse_scales(w, 4)[0] < max_scales(w, 4)[0]


def test_weighted_mse_scales_equal_a_brute_force_search_per_block() -> None:
    w = _weight(k=48, n=5, seed=7)
    importance = np.random.default_rng(8).uniform(0.0, 4.0, size=48)
    importance[:6] = 0.0  # inputs that never carry signal do not count
    got = mse_scales(w, 4, block=12, importance=importance)
    for g in range(4):
        rows = slice(12 * g, 12 * (g + 1))
        for c in range(w.shape[1]):
            col = w[rows, c].astype(np.float64)
            amax = float(np.abs(w[rows, c]).max())
            best, best_err = None, np.inf
            for i in range(81):
                s = np.float32(amax * (1 - i / 100) / 7)
                err = float(np.sum(importance[rows] * (col - s * np.clip(np.rint(w[rows, c] / s), -7, 7)) ** 2))
                if err < best_err:
                    best, best_err = s, err
            assert got[g, c] == best
    np.testing.assert_array_equal(mse_scales(w, 4, block=12, importance=np.ones(48)), mse_scales(w, 4, block=12))
    assert not np.array_equal(got, mse_scales(w, 4, block=12))


@pytest.mark.parametrize("importance", [np.ones(47), -np.ones(48), np.full(48, np.nan)])
def test_bad_importance_is_rejected(importance: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="importance"):
        mse_scales(_weight(k=48), 4, importance=importance)


def test_caller_scales_and_dequantize() -> None:
    w = _weight(k=8, n=3)
    s = np.array([0.1, 0.2, 0.3], np.float32)
    q = rtn(w, RtnConfig(bits=4), scales=s)
    np.testing.assert_array_equal(q.dequantize(), q.values.astype(np.float32) * s)
    with pytest.raises(ConfigError, match=r"expected \[3\]"):
        rtn(w, RtnConfig(bits=4), scales=np.ones(4, np.float32))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"bits": 1}, r"weight bits 1 not supported; allowed 2\.\.8"),
    ({"bits": 9}, r"weight bits 9 not supported; allowed 2\.\.8"),
    ({"block": 0}, "positive"),
])
def test_bad_config_is_rejected(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RtnConfig(**kwargs)


def test_block_that_does_not_divide_k_is_rejected_before_any_work() -> None:
    with pytest.raises(ConfigError, match="weight block 48 does not divide K=64"):
        rtn(_weight(k=64), RtnConfig(bits=4, block=48))
    with pytest.raises(ConfigError, match=r"2-D \[K, N\]"):
        rtn(np.zeros(5, np.float32), RtnConfig())


def test_quantized_weight_checks_its_invariants() -> None:
    from calib.errors import InternalError

    with pytest.raises(InternalError, match="grid"):
        QuantizedWeight(values=np.full((2, 2), 9, np.int8), scales=np.ones(2, np.float32), bits=4)
