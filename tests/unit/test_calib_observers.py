"""Observers and per-tensor statistics: exact state round trips, merge == one pass, layouts and valid rows."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.layout import TensorLayout, infer_layout, valid_rows
from calib.outliers import outlier_report
from calib.tensor_stats import TensorStats

rows_strategy = arrays(np.float32, st.tuples(st.integers(1, 40), st.just(6)), elements=st.floats(-100, 100, width=32))


def _stats(per_token: bool = True) -> TensorStats:
    stats = TensorStats.create("t", num_bins=256, per_token=per_token)
    stats.histogram.histogram.bin_width = 0.5  # a fixed grid, so separately collected states merge exactly
    return stats


def _assert_equal(a: TensorStats, b: TensorStats) -> None:
    sa, sb = a.state(), b.state()
    assert set(sa) == set(sb)
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


@settings(max_examples=30, deadline=None)
@given(a=rows_strategy, b=rows_strategy)
def test_merge_equals_one_pass_for_every_observer(a: np.ndarray, b: np.ndarray) -> None:
    ids_a = np.arange(a.shape[0], dtype=np.int64) % 5
    ids_b = np.arange(b.shape[0], dtype=np.int64) % 7
    one = _stats()
    one.update(a.copy(), ids_a)
    one.update(b.copy(), ids_b)
    left, right = _stats(), _stats()
    left.update(a.copy(), ids_a)
    right.update(b.copy(), ids_b)
    _assert_equal(left.merge(right), one)
    _assert_equal(TensorStats.from_state("t", one.state()), one)


def test_observers_agree_with_direct_numpy() -> None:
    rows = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    ids = np.random.default_rng(1).integers(0, 4, size=50)
    stats = _stats()
    stats.update(rows.copy(), ids)
    assert (stats.minmax.minimum, stats.minmax.maximum) == (float(rows.min()), float(rows.max()))
    assert stats.dims is not None and stats.dims.channel_amax is not None
    np.testing.assert_array_equal(stats.dims.channel_amax, np.abs(rows).max(axis=0))
    assert stats.tokens is not None
    for token in range(4):
        i = list(stats.tokens.token_ids).index(token)
        assert stats.tokens.counts[i] == (ids == token).sum()
        assert stats.tokens.max_abs[i] == np.abs(rows[ids == token]).max()
    assert stats.histogram.histogram.total == rows.size


def test_layout_probe_distinguishes_token_axes_from_equal_sized_feature_axes() -> None:
    # seq 32 equals head_dim 32 in the first run; only the token axis grows in the probe
    assert infer_layout((4, 2, 32, 32), (4, 2, 33, 32), batch=4, seq=32) == TensorLayout(token_axes=(2,))
    assert infer_layout((4, 2, 32, 32), (4, 2, 33, 33), batch=4, seq=32) == TensorLayout(token_axes=(2, -1))
    assert infer_layout((4 * 32, 8), (4 * 33, 8), batch=4, seq=32) == TensorLayout(flattened=True)
    assert infer_layout((4, 8), (4, 8), batch=4, seq=32) == TensorLayout()


def test_valid_rows_match_explicit_loops() -> None:
    rng = np.random.default_rng(2)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)
    ids = rng.integers(0, 100, size=(2, 4))
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)  # [B, H, S, D]
    rows, row_ids = valid_rows(x, TensorLayout(token_axes=(2,)), mask, ids)
    expected = [x[b, h, s] for b in range(2) for h in range(3) for s in range(4) if mask[b, s]]
    np.testing.assert_array_equal(rows, np.array(expected))
    assert row_ids is not None
    np.testing.assert_array_equal(row_ids, [ids[b, s] for b in range(2) for h in range(3) for s in range(4)
                                            if mask[b, s]])
    scores = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    values, _ = valid_rows(scores, TensorLayout(token_axes=(2, -1)), mask)
    expected_scores = [scores[b, h, q, k] for b in range(2) for h in range(3) for q in range(4) for k in range(4)
                       if mask[b, q] and mask[b, k]]
    np.testing.assert_array_equal(values.ravel(), expected_scores)
    flat = rng.standard_normal((8, 5)).astype(np.float32)
    rows_flat, _ = valid_rows(flat, TensorLayout(flattened=True), mask)
    np.testing.assert_array_equal(rows_flat, flat[mask.reshape(-1)])


def test_outlier_report_finds_a_planted_outlier_dimension() -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((400, 16)).astype(np.float32)
    ids = rng.integers(5, 50, size=400)
    rows[::50, 11] = 80.0  # dimension 11 carries the outliers, always at token 101
    ids[::50] = 101
    stats = TensorStats.create("h", per_token=True)
    stats.update(rows.copy(), ids.astype(np.int64))
    report = outlier_report({"h": stats}, {"h": (3, "fc2")}, token_name=lambda i: "[CLS]" if i == 101 else str(i))
    (row,) = report.rows
    assert row.outlier_dims == (11,) and row.layer == 3 and row.role == "fc2"
    assert row.top_tokens[0][0] == "[CLS]" and row.top_tokens[0][1] == 80.0
    second = float(np.delete(np.abs(rows).max(axis=0), 11).max())
    assert row.range_share == 1 - second / 80.0
    assert report.dimension_counts() == {11: 1}
    assert "11 (80.0)" in report.to_markdown()
