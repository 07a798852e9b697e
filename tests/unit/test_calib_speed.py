"""The collector's fast paths give exactly what the plain NumPy formulations give.

Blocked column reductions, in-place binning into scratch buffers, right-padding slices instead of boolean
selection, token maxima reduced over the heads first, and folding on several threads: each is checked bit for
bit against a direct computation written here (or the one-thread, no-scratch path)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from calib.collect import CollectOptions, collect
from calib.histogram import AbsHistogram, ceil_indices
from calib.layout import TensorLayout, prefix_lengths, token_row_max, valid_rows
from calib.observers import Scratch, TokenRows, column_reduce
from calib.statistics import DEFAULT_KINDS, TensorStatistics
from tests.toygraphs import bert_block_model

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=40, deadline=None)
@given(rows=arrays(np.float32, st.tuples(st.integers(1, 300), st.sampled_from([1, 3, 32, 64, 384])),
                   elements=finite))
def test_blocked_column_reduction_equals_numpy(rows: np.ndarray) -> None:
    np.testing.assert_array_equal(column_reduce(rows, np.minimum), rows.min(axis=0))
    np.testing.assert_array_equal(column_reduce(rows, np.maximum), rows.max(axis=0))


@settings(max_examples=40, deadline=None)
@given(values=arrays(np.float32, st.integers(1, 400), elements=st.floats(0, 1e4, width=32)),
       exponent=st.integers(-20, 5))
def test_ceil_indices_in_place_and_in_scratch_match_exact_arithmetic(values: np.ndarray, exponent: int) -> None:
    # the bin each value lands in: ceil - 1, with 0 for exact zeros (a subnormal whose scaled value underflows to
    # zero gives ceil 0 instead of 1: the same bin 0)
    expected = [max(math.ceil(Fraction(float(v)) / Fraction(2) ** exponent) - 1, 0) for v in values]
    scratch = np.empty(values.size + 7, dtype=np.intp)
    np.testing.assert_array_equal(np.maximum(ceil_indices(values, exponent) - 1, 0), expected)
    np.testing.assert_array_equal(
        np.maximum(ceil_indices(values.copy(), exponent, overwrite=True, out=scratch) - 1, 0), expected)


@settings(max_examples=40, deadline=None)
@given(parts=st.lists(arrays(np.float32, st.integers(1, 200), elements=finite), min_size=1, max_size=4))
def test_histogram_with_scratch_and_overwrite_equals_the_plain_update(parts: list[np.ndarray]) -> None:
    plain, fast = AbsHistogram(bins=256), AbsHistogram(bins=256)
    scratch = Scratch()
    for part in parts:
        plain.update(np.abs(part))
        fast.update(np.abs(part), overwrite=True, scratch=scratch.intp(part.size))
    assert plain.exponent == fast.exponent and plain.pending_zeros == fast.pending_zeros
    np.testing.assert_array_equal(plain.counts, fast.counts)


def _right_padded(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    lengths = rng.integers(0, seq + 1, size=batch)
    return np.arange(seq)[None, :] < lengths[:, None]


@pytest.mark.parametrize(("shape", "layout"), [
    ((3, 7, 5), TensorLayout(token_axes=(1,))),  # hidden [B, S, D]
    ((3, 2, 7, 4), TensorLayout(token_axes=(2,))),  # attention operand [B, H, S, d]
    ((3, 2, 7, 7), TensorLayout(token_axes=(2, -1))),  # scores [B, H, S, S]
    ((3, 2, 4, 7), TensorLayout(token_axes=(-1,))),  # keys transposed [B, H, d, S]
])
def test_padding_slices_equal_the_boolean_selection(shape: tuple[int, ...], layout: TensorLayout) -> None:
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    ids = rng.integers(0, 50, size=(shape[0], 7))
    for trial in range(6):
        mask = _right_padded(rng, shape[0], 7)
        if trial == 5:  # not right-padded: the boolean path
            mask[0, 0], mask[0, -1] = False, True
        assert (prefix_lengths(mask) is None) == (trial == 5)
        rows, row_ids = valid_rows(x, layout, mask, ids)
        axes = [len(shape) - 1 if a == -1 else a for a in layout.token_axes]
        keep = np.ones(shape if not layout.has_dims else shape[:-1], dtype=bool)
        for axis in axes:  # written apart from calib.layout: the mask broadcast onto each token axis
            view = [1] * keep.ndim
            view[0], view[axis] = shape[0], 7
            keep = keep & mask.reshape(view)
        width = shape[-1] if layout.has_dims else 1
        np.testing.assert_array_equal(rows, x.reshape(-1, width)[keep.reshape(-1)])
        if row_ids is not None:
            view = [1] * keep.ndim
            view[0], view[axes[0]] = shape[0], 7
            np.testing.assert_array_equal(row_ids, np.broadcast_to(ids.reshape(view), keep.shape)[keep])


def test_token_maxima_reduced_over_heads_equal_the_per_row_statistics() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 9, 8)).astype(np.float32)  # [B, H, S, d]
    mask = _right_padded(rng, 4, 9)
    ids = rng.integers(0, 20, size=(4, 9))
    layout = TensorLayout(token_axes=(2,))
    rows, row_ids = valid_rows(x, layout, mask, ids)
    reduced = token_row_max(x, layout, mask, ids)
    assert reduced is not None and reduced[2] == 3
    generic, fast = TensorStatistics.create("t", DEFAULT_KINDS, bins=256), TensorStatistics.create("t", bins=256)
    generic.update(rows.copy(), row_ids)
    fast.update(rows.copy(), row_ids, scratch=Scratch(), token_rows=TokenRows(*reduced))
    assert token_row_max(x[:, 0], TensorLayout(token_axes=(1,)), mask, ids) is None  # [B, S, D]: rows as they are
    for key, value in generic.state().items():
        np.testing.assert_array_equal(fast.state()[key], value, err_msg=key)


def test_folding_on_two_threads_gives_the_one_thread_bytes() -> None:
    model = bert_block_model(layers=2, hidden=32, heads=2, ffn=64)
    tensors = [o for n in model.graph.node for o in n.output
               if n.op_type in ("MatMul", "Softmax", "LayerNormalization", "Add", "Transpose")]
    rng = np.random.default_rng(11)
    feeds = []
    for _ in range(5):
        mask = _right_padded(rng, 4, 10)
        mask[:, 0] = True
        feeds.append({"input_ids": np.where(mask, rng.integers(1000, 2000, size=mask.shape), 0).astype(np.int64),
                      "attention_mask": mask.astype(np.int64)})
    one = collect(model, feeds, tensors, CollectOptions(bins=256, fold_threads=1, threads=1)).statistics
    two = collect(model, feeds, tensors, CollectOptions(bins=256, fold_threads=2)).statistics
    assert one.state_bytes() == two.state_bytes()
