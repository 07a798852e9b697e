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
    # x / scale is computed in float32 (as TensorRT does): a value a hair below a tie can round onto the tie
    # and then to even, so the bound carries float32 rounding of the quotient (|x| * 2^-23) and of dq.
    eps32 = float(np.finfo(np.float32).eps)
    assert err <= float(scale) / 2 + 2 * abs(float(x)) * eps32 + float(scale) * eps32


def test_tie_rounding_case_stays_within_float32_bound() -> None:
    # amax 45, x = 22.5: x / scale rounds to exactly 63.5 in float32 and goes to 64 (half to even)
    scale = scale_from_amax(45.0)
    x = np.float32(22.5)
    assert int(quantize(x, scale)) == 64
    err = abs(float(dequantize(quantize(x, scale), scale)) - float(x))
    assert float(scale) / 2 < err <= float(scale) / 2 + 2 * 22.5 * float(np.finfo(np.float32).eps)


def test_per_channel_scales_broadcast() -> None:
    x = np.array([[1.0, 10.0], [-1.0, -10.0]], dtype=np.float32)
    scales = np.array([1 / 127, 10 / 127], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, scales), np.array([[127, 127], [-127, -127]], dtype=np.int8))
    np.testing.assert_allclose(fake_quantize(x, scales), x, rtol=1e-6)
