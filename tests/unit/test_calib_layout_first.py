"""calib.layout.first_token_rows: the row of each sample's first valid token, for every padding side."""

from __future__ import annotations

import numpy as np

from calib.layout import TensorLayout, first_token_rows


def _x() -> np.ndarray:
    return np.arange(3 * 4 * 2, dtype=np.float32).reshape(3, 4, 2)


def test_right_and_left_padding_and_no_mask() -> None:
    x = _x()
    right = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=bool)
    rows, samples = first_token_rows(x, TensorLayout(token_axes=(1,)), right)
    np.testing.assert_array_equal(rows, x[:, 0])
    np.testing.assert_array_equal(samples, [0, 1, 2])
    left = np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)  # sample 2 is all padding
    rows, samples = first_token_rows(x, TensorLayout(token_axes=(1,)), left)
    np.testing.assert_array_equal(rows, np.stack([x[0, 2], x[1, 0]]))
    np.testing.assert_array_equal(samples, [0, 1])
    rows, samples = first_token_rows(x, TensorLayout(token_axes=(1,)), None)
    np.testing.assert_array_equal(rows, x[:, 0])


def test_flattened_batch_sequence_axis() -> None:
    x = _x()
    mask = np.array([[0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=bool)
    rows, samples = first_token_rows(x.reshape(12, 2), TensorLayout(flattened=True), mask)
    np.testing.assert_array_equal(rows, np.stack([x[0, 1], x[1, 0], x[2, 0]]))
    np.testing.assert_array_equal(samples, [0, 1, 2])


def test_tensors_without_one_token_axis_give_none() -> None:
    x = _x()
    mask = np.ones((3, 4), dtype=bool)
    assert first_token_rows(x, TensorLayout(), mask) is None  # no token axis
    assert first_token_rows(x, TensorLayout(token_axes=(1, -1)), mask) is None  # per-token last axis
    assert first_token_rows(np.zeros((3, 2, 4, 4), np.float32), TensorLayout(token_axes=(2, 3)), mask) is None
