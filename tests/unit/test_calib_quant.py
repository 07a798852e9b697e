"""Symmetric INT8 numerics: round half to even, clamp, error bound (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from calib.errors import CalibrationError
from calib.quant import dequantize, fake_quantize, quantize, scale_from_amax


def test_round_half_to_even_and_clamp() -> None:
    scale = np.float32(0.5)
    x = np.array([0.25, 0.75, 1.25, -0.25, -0.75, 100.0, -100.0], dtype=np.float32)  # x/s = .5, 1.5, 2.5, ...
    np.testing.assert_array_equal(quantize(x, scale), np.array([0, 2, 2, 0, -2, 127, -128], dtype=np.int8))
    assert quantize(np.float32(-100.0), scale, narrow=True) == -127


def test_scale_from_amax_is_float32_of_amax_over_127() -> None:
    assert scale_from_amax(1.0) == np.float32(1.0 / 127.0)
    assert scale_from_amax(1.0).dtype == np.float32
    with pytest.raises(CalibrationError, match="inf"):
        scale_from_amax(float("inf"))


@settings(max_examples=200, deadline=None)
@given(amax=st.floats(1e-3, 1e3), fraction=st.floats(-1.0, 1.0))
def test_error_is_at_most_half_a_step_inside_the_range(amax: float, fraction: float) -> None:
    scale = scale_from_amax(amax)
    x = np.float32(fraction * amax)
    if abs(float(x)) > 127 * float(scale):  # float32 rounding of amax may put x a hair outside the grid
        return
    err = abs(float(dequantize(quantize(x, scale), scale)) - float(x))
    assert err <= float(scale) / 2 * (1 + 1e-6)


def test_per_channel_scales_broadcast() -> None:
    x = np.array([[1.0, 10.0], [-1.0, -10.0]], dtype=np.float32)
    scales = np.array([1 / 127, 10 / 127], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, scales), np.array([[127, 127], [-127, -127]], dtype=np.int8))
    np.testing.assert_allclose(fake_quantize(x, scales), x, rtol=1e-6)
