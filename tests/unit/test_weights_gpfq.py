"""GPFQ in brevitas' matrix form against the closed-form greedy path following on the data itself.

Reference (Lybrand & Saab 2021, arXiv 2010.15979; Zhang, Zhou & Saab 2023, arXiv 2201.11113), one output
channel at a time: u_0 = 0, q_t = Q(<X~_t, u_{t-1} + w_t X_t> / ||X~_t||^2), u_t = u_{t-1} + w_t X_t - q_t X~_t.
"""

from __future__ import annotations

import numpy as np
import pytest

from calib.errors import ConfigError
from calib.weights import GpfqConfig, GpfqObserver, gpfq


def _data(seed: int, k: int = 40, n: int = 3, rows: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W [K, N], X float inputs, X~ the same inputs after INT8 per-tensor fake quantization)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) @ (np.eye(k) + 0.2 * rng.standard_normal((k, k)))).astype(np.float32)
    step = np.float32(np.abs(x).max() / 127 * 4)  # coarse, so X~ differs visibly from X
    xq = (np.clip(np.rint(x / step), -128, 127) * step).astype(np.float32)
    return (rng.standard_normal((k, n)) * 0.2).astype(np.float32), x, xq


def _path_following(w: np.ndarray, x: np.ndarray, xq: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """Integer codes of one channel w [K] by greedy path following on the rows themselves."""
    limit = 2 ** (bits - 1) - 1
    u = np.zeros(x.shape[0])
    codes = np.zeros(w.shape[0], np.int64)
    for t in range(w.shape[0]):
        xt, xqt = x[:, t].astype(np.float64), xq[:, t].astype(np.float64)
        norm = xqt @ xqt
        argument = xqt @ (u + w[t] * xt) / norm if norm > 0 else 0.0
        codes[t] = np.clip(np.rint(argument / scale), -limit, limit)
        u = u + w[t] * xt - codes[t] * scale * xqt
    return codes


def _matrices(x: np.ndarray, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obs = GpfqObserver(x.shape[1])
    obs.update(xq, x)
    return obs.matrices()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_gpfq_on_a_one_channel_layer_equals_the_closed_form(bits: int) -> None:
    w, x, xq = _data(seed=bits, n=1)
    h, g = _matrices(x, xq)
    got = gpfq(w, h, g, GpfqConfig(bits=bits))
    np.testing.assert_array_equal(got.values[:, 0], _path_following(w[:, 0], x, xq, float(got.scales[0]), bits))


def test_every_channel_of_a_wider_layer_follows_its_own_path() -> None:
    w, x, xq = _data(seed=10, k=150, n=4)  # K > 128: the lazy history blocks are exercised
    h, g = _matrices(x, xq)
    got = gpfq(w, h, g, GpfqConfig(bits=4))
    for c in range(4):
        np.testing.assert_array_equal(got.values[:, c], _path_following(w[:, c], x, xq, float(got.scales[c]), 4))


def test_act_order_follows_the_path_in_descending_diag_order() -> None:
    w, x, xq = _data(seed=11)
    h, g = _matrices(x, xq)
    perm = np.argsort(-np.diag(h), kind="stable")
    got = gpfq(w, h, g, GpfqConfig(bits=3, act_order=True))
    for c in range(3):
        expected = _path_following(w[perm, c], x[:, perm], xq[:, perm], float(got.scales[c]), 3)
        np.testing.assert_array_equal(got.values[perm, c], expected)


def test_dead_quantized_input_gets_zero_and_its_float_part_is_compensated() -> None:
    w, x, xq = _data(seed=12, n=1)
    xq[:, 3] = 0.0  # the quantized model's input is zero here, the float model's is not
    h, g = _matrices(x, xq)
    got = gpfq(w, h, g, GpfqConfig(bits=4))
    assert got.values[3, 0] == 0
    np.testing.assert_array_equal(got.values[:, 0], _path_following(w[:, 0], x, xq, float(got.scales[0]), 4))


def test_gpfq_is_invariant_to_a_common_power_of_two_normalization() -> None:
    w, x, xq = _data(seed=13)
    h, g = _matrices(x, xq)
    a = gpfq(w, h, g, GpfqConfig(bits=4, block=8))
    b = gpfq(w, h * 2.0**-7, g * 2.0**-7, GpfqConfig(bits=4, block=8))
    np.testing.assert_array_equal(a.values, b.values)
    assert a.scales.shape == (5, 3)


def test_gpfq_corrects_for_quantized_inputs_better_than_rounding() -> None:
    w, x, xq = _data(seed=14, k=64, n=8, rows=800)
    h, g = _matrices(x, xq)
    target = x.astype(np.float64) @ w
    got = gpfq(w, h, g, GpfqConfig(bits=4))
    from calib.weights import RtnConfig, rtn

    def err(q: np.ndarray) -> float:
        return float(np.linalg.norm(xq.astype(np.float64) @ q - target))
    assert err(got.dequantize()) < 0.9 * err(rtn(w, RtnConfig(bits=4)).dequantize())


def test_bad_gpfq_inputs() -> None:
    w = np.ones((4, 2), np.float32)
    with pytest.raises(ConfigError, match=r"G \(X~\^T X\) must be \[4, 4\]"):
        gpfq(w, np.eye(4), np.eye(3), GpfqConfig())
    with pytest.raises(ConfigError, match="weight block 3 does not divide K=4"):
        gpfq(w, np.eye(4), np.eye(4), GpfqConfig(block=3))
