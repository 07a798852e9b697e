"""OPTQ/GPTQ against an independent column-by-column reference (explicit inverse Hessian, OBS elimination).

The reference follows Frantar et al. 2022 (arXiv 2210.17323) equations 2-3 directly: quantize input t, spread
its error over the later inputs with row t of the current inverse Hessian, then eliminate t from the inverse
(H^-1 <- H^-1 - H^-1[:, t] H^-1[t, :] / H^-1[t, t]). It uses neither Cholesky factors nor lazy batches.
"""

from __future__ import annotations

import numpy as np
import pytest

from calib.errors import CalibrationError, ConfigError
from calib.weights import OptqConfig, RtnConfig, optq, rtn

K, N = 150, 8  # K > 128: two lazy blocks with the default lazy_block


def _problem(seed: int = 0, k: int = K, n: int = N) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W [K, N] float32, X [rows, K] float32 with correlated features, H = 2/n X^T X)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = (rng.standard_normal((600, k)) @ mix * rng.uniform(0.2, 3.0, size=k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    x64 = x.astype(np.float64)
    return w, x, 2.0 / x.shape[0] * (x64.T @ x64)


def _scale(rows: np.ndarray, limit: int) -> np.ndarray:
    amax = np.abs(rows).max(axis=0).astype(np.float64)
    return np.where(amax > 0, amax / limit, 1.0).astype(np.float32).astype(np.float64)


def _reference(w: np.ndarray, h: np.ndarray, bits: int, percdamp: float = 0.01,
               block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Codes [K, N] and scales of OPTQ computed column by column (per-block scales from the current weights)."""
    limit = 2 ** (bits - 1) - 1
    w, h = w.astype(np.float64).copy(), h.copy()
    scale = _scale(w, limit)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.inv(h)
    codes = np.zeros(w.shape, np.int8)
    scales = []
    for t in range(w.shape[0]):
        if block is not None and t % block == 0:
            scale = _scale(w[t:t + block], limit)
            scales.append(scale)
        q = np.clip(np.rint(w[t] / scale), -limit, limit)
        codes[t] = q
        error = (w[t] - scale * q) / hinv[t, t]
        w[t + 1:] -= np.outer(hinv[t, t + 1:], error)
        hinv = hinv - np.outer(hinv[:, t], hinv[t, :]) / hinv[t, t]
    return codes, (np.array(scales) if block is not None else scale)


@pytest.mark.parametrize("bits", [8, 4, 3])
def test_optq_with_one_block_equals_the_column_by_column_reference(bits: int) -> None:
    w, _, h = _problem()
    got = optq(w, h, OptqConfig(bits=bits, lazy_block=K))
    codes, scales = _reference(w, h, bits)
    np.testing.assert_array_equal(got.values, codes)
    np.testing.assert_array_equal(got.scales, scales.astype(np.float32))


@pytest.mark.parametrize("lazy_block", [1, 7, 128])
def test_lazy_batch_updates_do_not_change_the_result(lazy_block: int) -> None:
    w, _, h = _problem(seed=1)
    one = optq(w, h, OptqConfig(bits=4, lazy_block=K))
    np.testing.assert_array_equal(optq(w, h, OptqConfig(bits=4, lazy_block=lazy_block)).values, one.values)


@pytest.mark.parametrize("lazy_block", [7, 128])
def test_block_scales_are_recomputed_from_the_updated_weights_at_block_starts(lazy_block: int) -> None:
    w, _, h = _problem(seed=2, k=120)
    got = optq(w, h, OptqConfig(bits=4, block=24, lazy_block=lazy_block))
    codes, scales = _reference(w, h, 4, block=24)
    np.testing.assert_array_equal(got.values, codes)
    np.testing.assert_allclose(got.scales, scales, rtol=2.0**-23, atol=0)  # within 1 float32 ulp
    static = optq(w, h, OptqConfig(bits=4, block=24, static_block_scales=True))
    assert not np.array_equal(static.scales, got.scales)  # recomputation really happened


def test_act_order_equals_the_reference_on_the_permuted_problem() -> None:
    w, _, h = _problem(seed=3)
    perm = np.argsort(-np.diag(h), kind="stable")
    got = optq(w, h, OptqConfig(bits=4, act_order=True))
    codes, _ = _reference(w[perm], h[np.ix_(perm, perm)], 4)
    np.testing.assert_array_equal(got.values[perm], codes)
    assert not np.array_equal(got.values, optq(w, h, OptqConfig(bits=4)).values)


def test_dead_inputs_get_zero_weights() -> None:
    w, x, _ = _problem(seed=4)
    x[:, [5, 77]] = 0.0
    x64 = x.astype(np.float64)
    h = 2.0 / x.shape[0] * (x64.T @ x64)
    got = optq(w, h, OptqConfig(bits=4))
    assert np.all(got.values[[5, 77]] == 0)
    np.testing.assert_array_equal(got.values, _reference(w, h, 4)[0])


def test_optq_beats_rtn_on_its_objective_at_low_bits() -> None:
    w, _, h = _problem(seed=5)
    for bits in (3, 4):
        def loss(q: np.ndarray) -> float:
            d = w.astype(np.float64) - q
            return float(np.trace(d.T @ h @ d))
        baseline = loss(rtn(w, RtnConfig(bits=bits)).dequantize())
        assert loss(optq(w, h, OptqConfig(bits=bits)).dequantize()) < 0.9 * baseline


def test_mse_scales_weigh_each_input_by_the_hessian_diagonal() -> None:
    from calib.weights import ScaleMethod, mse_scales

    w, _, h = _problem(seed=6, k=96)
    got = optq(w, h, OptqConfig(bits=4, block=32, scale_method=ScaleMethod.MSE, static_block_scales=True))
    expected = mse_scales(w, 4, block=32, importance=np.diag(h))
    np.testing.assert_array_equal(got.scales, expected)
    assert not np.array_equal(expected, mse_scales(w, 4, block=32))  # the weighting changes the choice here
    same = optq(w, h, OptqConfig(bits=4, block=32, static_block_scales=True), scales=expected)
    np.testing.assert_array_equal(got.values, same.values)


def test_bad_hessians_are_rejected() -> None:
    w = np.ones((2, 3), np.float32)
    with pytest.raises(CalibrationError, match="not positive definite"):
        optq(w, np.array([[1.0, 2.0], [2.0, 1.0]]), OptqConfig(percdamp=0.0))
    with pytest.raises(ConfigError, match=r"Hessian must be \[2, 2\]"):
        optq(w, np.eye(3), OptqConfig())
    with pytest.raises(ConfigError, match="static_block_scales"):
        OptqConfig(bits=4, block=32, act_order=True)
    with pytest.raises(ConfigError, match="lazy_block"):
        OptqConfig(lazy_block=0)


def test_config_decodes_strictly_from_recipe_data() -> None:
    from calib.schema import convert, to_builtins

    data = {"bits": 4, "block": 128, "static_block_scales": True, "scale_method": "mse",
            "accumulator": {"accumulator_bits": 16, "tile": 128}}
    config = convert(data, OptqConfig, "recipe")
    assert config.accumulator is not None and config.accumulator.tile == 128
    assert convert(to_builtins(config), OptqConfig, "again") == config
    with pytest.raises(ConfigError, match=r"unknown key 'percdmp'.*did you mean 'percdamp'"):
        convert({"percdmp": 0.1}, OptqConfig, "recipe")
