"""The NumPy references against independent float64 formulas, and the node schemas' validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.errors import GraphError
from plugins.layernorm_quant.reference import layernorm_quantize
from plugins.layernorm_quant.schema import LayerNormQuantizeAttrs
from plugins.softmax_quant.reference import softmax_quantize
from plugins.softmax_quant.schema import SoftmaxQuantizeAttrs, check_mask_shape


def _ln64(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + b


@settings(max_examples=40, deadline=None)
@given(hidden=st.integers(1, 300), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1.0))
def test_layernorm_codes_within_one_step_of_float64(hidden: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((3, hidden)) * 5).astype(np.float32)
    g, b = rng.standard_normal(hidden).astype(np.float32), rng.standard_normal(hidden).astype(np.float32)
    q, tok, y = layernorm_quantize(x, g, b, epsilon=1e-5, scale=scale)
    y64 = _ln64(x, g, b, 1e-5)
    assert tok is None and q.dtype == np.int8
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-4)
    expected = np.clip(np.rint(y64 / np.float32(scale)), -128, 127)
    assert np.max(np.abs(q.astype(np.int64) - expected)) <= 1
    in_range = np.abs(y64) < 127 * scale
    assert np.all(np.abs(q[in_range] * np.float32(scale) - y64[in_range]) <= scale / 2 * (1 + 1e-3) + 1e-6)


def test_per_token_scale_is_absmax_over_127_and_constant_rows_are_beta() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[1] = 3.0
    g, b = np.ones(64, np.float32), np.zeros(64, np.float32)
    q, tok, y = layernorm_quantize(x, g, b, epsilon=1e-5, per_token=True)
    assert tok is not None and tok.shape == (4, 1)
    np.testing.assert_array_equal(tok[[0, 2, 3]], np.abs(y[[0, 2, 3]]).max(-1, keepdims=True) / np.float32(127))
    assert tok[1, 0] == 1.0 and not q[1].any()  # constant row, beta 0: y == 0, scale 1, codes 0
    assert np.all(np.abs(q[[0, 2, 3]]).max(-1) == 127)


def test_residual_is_added_before_normalizing() -> None:
    rng = np.random.default_rng(2)
    x, r = rng.standard_normal((2, 32)).astype(np.float32), rng.standard_normal((2, 32)).astype(np.float32)
    g, b = np.ones(32, np.float32), np.zeros(32, np.float32)
    np.testing.assert_array_equal(layernorm_quantize(x, g, b, r, epsilon=1e-5, scale=0.05)[0],
                                  layernorm_quantize(x + r, g, b, epsilon=1e-5, scale=0.05)[0])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_softmax_codes_within_one_step_of_float64(n: int, seed: int) -> None:
    x = (np.random.default_rng(seed).standard_normal((3, n)) * 6).astype(np.float32)
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    q = softmax_quantize(x, scale=1 / 127)
    assert np.max(np.abs(q.astype(np.int64) - np.rint(p * 127))) <= 1


def test_fully_masked_softmax_row_is_zero_not_nan() -> None:
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    mask = np.zeros((2, 8), np.float32)
    mask[0] = -np.inf
    q = softmax_quantize(x, mask, scale=1 / 127)
    assert not q[0].any() and q[1].sum() > 100


@pytest.mark.parametrize("bad", [0.0, -1e-5, float("nan"), float("inf")])
def test_bad_epsilon_and_scale_are_rejected(bad: float) -> None:
    with pytest.raises(GraphError, match="epsilon"):
        LayerNormQuantizeAttrs(epsilon=bad)
    with pytest.raises(GraphError, match="scale"):
        LayerNormQuantizeAttrs(epsilon=1e-5, scale=bad)
    with pytest.raises(GraphError, match="scale"):
        SoftmaxQuantizeAttrs(scale=bad)


def test_attributes_round_trip_and_unknown_names_fail() -> None:
    attrs = LayerNormQuantizeAttrs(epsilon=1e-12, scale=0.1, has_residual=True, emit_normalized=True)
    assert LayerNormQuantizeAttrs.from_json(attrs.to_json()) == attrs
    assert LayerNormQuantizeAttrs.from_onnx_attributes(attrs.to_onnx_attributes()) == attrs
    sm = SoftmaxQuantizeAttrs(scale=0.01, has_mask=True)
    assert SoftmaxQuantizeAttrs.from_onnx_attributes(sm.to_onnx_attributes()) == sm
    with pytest.raises(GraphError, match="did you mean 'epsilon'"):
        LayerNormQuantizeAttrs.from_onnx_attributes({"epsilom": 1e-5})
    with pytest.raises(GraphError, match="plugin_version"):
        SoftmaxQuantizeAttrs.from_onnx_attributes({"plugin_version": "2"})


def test_mask_shapes_follow_numpy_broadcasting() -> None:
    check_mask_shape((2, 12, 7, 7), (2, 1, 1, 7))
    check_mask_shape((2, 12, 7, 7), (7,))
    with pytest.raises(GraphError, match="mask dim"):
        check_mask_shape((2, 12, 7, 7), (2, 3, 1, 7))
    with pytest.raises(GraphError, match="rank"):
        check_mask_shape((7, 7), (1, 7, 7))
