"""Observers and per-tensor statistics: exact state round trips, merge == one pass, layouts and valid rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.errors import CalibrationError
from calib.layout import TensorLayout, infer_layout, valid_rows
from calib.observers import OBSERVER_KINDS
from calib.outliers import OutlierReport, outlier_report
from calib.statistics import (
    DEFAULT_KINDS,
    BatchRange,
    Statistics,
    StatisticsMeta,
    TensorStatistics,
    batch_digest,
    combine_digests,
)

finite = st.floats(-100, 100, width=32)
with_mask = st.one_of(finite, st.just(-np.inf), st.just(float(np.finfo(np.float32).min)))
rows_strategy = arrays(np.float32, st.tuples(st.integers(1, 40), st.just(6)), elements=with_mask)


def _stats() -> TensorStatistics:
    return TensorStatistics.create("t", tuple(k for k in OBSERVER_KINDS if k != "hessian"), bins=256)


def _assert_equal(a: TensorStatistics, b: TensorStatistics) -> None:
    sa, sb = a.state(), b.state()
    assert set(sa) == set(sb)
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(rows_strategy, min_size=1, max_size=4), data=st.data())
def test_shards_merged_equal_one_pass_for_every_observer_kind(parts: list[np.ndarray], data: st.DataObject) -> None:
    ids = [np.arange(p.shape[0], dtype=np.int64) % (5 + i) for i, p in enumerate(parts)]
    one = _stats()
    for part, part_ids in zip(parts, ids, strict=True):
        one.update(part.copy(), part_ids)
    cut = data.draw(st.integers(0, len(parts)))
    order = data.draw(st.permutations(range(len(parts))))
    left, right = _stats(), _stats()
    for i in order[:cut]:
        left.update(parts[i].copy(), ids[i])
    for i in order[cut:]:
        right.update(parts[i].copy(), ids[i])
    # the property covers every kind there is, except the Hessian of GEMM inputs, which refuses the mask sentinels
    # drawn here (tests/unit/test_hessian_observer.py holds its merges to one pass)
    assert set(one.observers) == set(OBSERVER_KINDS) - {"hessian"}
    _assert_equal(left.merge(right), one)
    _assert_equal(TensorStatistics.from_state("t", one.state()), one)


def test_statistics_of_shards_merge_into_the_one_pass_file_byte_for_byte(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    batches = [rng.standard_normal((5 + i, 6)).astype(np.float32) for i in range(5)]

    def collect(indices: range) -> Statistics:
        tensors = {"t": _stats()}
        digest = ""
        for i in indices:
            tensors["t"].update(batches[i].copy(), None)
            digest = combine_digests(digest, batch_digest(i, {"x": batches[i]}))
        meta = StatisticsMeta(model_sha256="m", tensors=("t",), kinds={"t": DEFAULT_KINDS}, options={"bins": 256},
                              layouts={}, batches=(BatchRange(start=indices.start, stop=indices.stop),),
                              samples=len(indices), data_digest=digest, complete=True)
        return Statistics(meta=meta, tensors=tensors)

    one = collect(range(0, 5))
    merged = collect(range(3, 5)).merge(collect(range(0, 1))).merge(collect(range(1, 3)))
    assert merged.state_bytes() == one.state_bytes()
    one.save(tmp_path / "s.npz")
    assert Statistics.load(tmp_path / "s.npz").state_bytes() == one.state_bytes()
    with pytest.raises(CalibrationError, match="overlap"):
        collect(range(0, 2)).merge(collect(range(1, 3)))


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


def test_mask_sentinels_are_excluded_from_every_statistic() -> None:
    rows = np.array([[1.0, -np.inf], [-3.0, 2.0]], dtype=np.float32)
    stats = _stats()
    stats.update(rows, np.array([7, 8], dtype=np.int64))
    assert stats.mask_values == 1 and (stats.minmax.minimum, stats.minmax.maximum) == (-3.0, 2.0)
    assert stats.dims is not None and stats.dims.channel_amax is not None
    np.testing.assert_array_equal(stats.dims.channel_amax, [3.0, 2.0])
    assert stats.histogram.histogram.total == 3
    strict = TensorStatistics.create("t", allow_mask_values=False)
    with pytest.raises(CalibrationError, match="mask"):
        strict.update(rows)
    with pytest.raises(CalibrationError, match="NaN"):
        stats.update(np.array([[np.nan, 1.0]], dtype=np.float32))


def test_layout_probe_distinguishes_token_axes_from_equal_sized_feature_axes() -> None:
    # seq 32 equals head_dim 32 in the first run; only the token axis grows in the probe
    assert infer_layout((4, 2, 32, 32), (4, 2, 33, 32), batch=4, seq=32) == TensorLayout(token_axes=(2,))
    assert infer_layout((4, 2, 32, 32), (4, 2, 33, 33), batch=4, seq=32) == TensorLayout(token_axes=(2, -1))
    assert infer_layout((4 * 32, 8), (4 * 33, 8), batch=4, seq=32) == TensorLayout(flattened=True)
    assert infer_layout((4, 8), (4, 8), batch=4, seq=32) == TensorLayout()


def test_a_merged_batch_and_heads_axis_is_told_by_a_second_batch_size() -> None:
    # [B*H, S, S] scores (DeBERTa, BLOOM): B=4, H=3; at batch 1 axis 0 is 3
    shapes = ((12, 32, 32), (12, 33, 33))
    merged = TensorLayout(token_axes=(1, -1), batch_group=3)
    assert infer_layout(*shapes, batch=4, seq=32, other=((3, 32, 32), 1)) == merged
    assert infer_layout(*shapes, batch=4, seq=32) == TensorLayout()  # without it: padding cannot be excluded
    assert infer_layout(*shapes, batch=4, seq=32, other=((12, 32, 32), 1)) == TensorLayout()  # axis 0 fixed: 12
    assert infer_layout((12, 32, 8), (12, 33, 8), batch=4, seq=32, other=((3, 32, 8), 1)) == TensorLayout(
        token_axes=(1,), batch_group=3)


def test_a_merged_tensor_is_read_as_batch_then_heads() -> None:
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(6, 4, 4)
    view, layout = TensorLayout(token_axes=(1, -1), batch_group=3).split_batch(x)
    assert layout == TensorLayout(token_axes=(2, -1))
    assert view.shape == (2, 3, 4, 4) and np.array_equal(view[1, 2], x[5])  # batch-major: row b * H + h
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=bool)
    rows, _ = valid_rows(view, layout, mask)
    expected = [x[b * 3 + h, q, k] for b in range(2) for h in range(3) for q in range(4) for k in range(4)
                if mask[b, q] and mask[b, k]]
    assert sorted(rows.ravel().tolist()) == sorted(expected)
    with pytest.raises(CalibrationError, match="multiple"):
        TensorLayout(batch_group=4).split_batch(x)


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
    stats = TensorStatistics.create("h")
    stats.update(rows.copy(), ids.astype(np.int64))
    report = outlier_report({"h": stats}, {"h": (3, "fc2")}, token_name=lambda i: "[CLS]" if i == 101 else str(i))
    (row,) = report.rows
    assert row.outlier_dims == (11,) and row.layer == 3 and row.role == "fc2"
    assert row.top_tokens[0][0] == "[CLS]" and row.top_tokens[0][1] == 80.0
    second = float(np.delete(np.abs(rows).max(axis=0), 11).max())
    assert row.range_share == 1 - second / 80.0
    assert report.dimension_counts() == {11: 1}
    assert "11 (80.0)" in report.to_markdown()
    assert OutlierReport.from_json(report.to_json()) == report
