"""Evaluation metrics against independent references (scipy, sklearn, numpy written out here)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from scipy.spatial import distance

from builder.evaluate.metrics import (
    ErrorAccumulator,
    average_ranks,
    fit_probe,
    pair_similarities,
    row_cosine,
    similarity_spearman,
    spearman,
)
from calib.errors import ConfigError


def test_row_cosine_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 7))
    b = a + 0.3 * rng.normal(size=(20, 7))
    expected = np.array([1.0 - distance.cosine(x, y) for x, y in zip(a, b, strict=True)])
    np.testing.assert_allclose(row_cosine(a, b), expected, rtol=1e-12, atol=1e-12)


def test_row_cosine_of_identical_rows_is_one_and_of_opposite_is_minus_one() -> None:
    a = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]])
    np.testing.assert_allclose(row_cosine(a, a), [1.0, 1.0])
    np.testing.assert_allclose(row_cosine(a, -a), [-1.0, -1.0])


def test_row_cosine_rejects_shape_mismatch() -> None:
    with pytest.raises(ConfigError, match="cannot be compared"):
        row_cosine(np.ones((3, 4)), np.ones((3, 5)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=-5, max_value=5), min_size=2, max_size=40))
def test_average_ranks_match_scipy_rankdata_with_ties(values: list[int]) -> None:
    np.testing.assert_array_equal(average_ranks(values), stats.rankdata(values, method="average"))


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=-20, max_value=20), st.floats(min_value=-1, max_value=1, width=32)),
        min_size=3,
        max_size=50,
    )
)
def test_spearman_matches_scipy(pairs: list[tuple[int, float]]) -> None:
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]
    ours = spearman(a, b)
    ref = stats.spearmanr(a, b).statistic
    if np.isnan(ref):
        assert np.isnan(ours)
    else:
        assert ours == pytest.approx(ref, abs=1e-12)


def test_spearman_of_monotone_transform_is_one() -> None:
    x = np.linspace(-3, 3, 25)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -(x**3)) == pytest.approx(-1.0)


def test_pair_similarities_and_spearman_over_rated_pairs() -> None:
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(6, 5))
    pairs = [(i, j, float(i * 10 + j)) for i in range(6) for j in range(i + 1, 6)]
    sims = pair_similarities(emb, pairs)
    expected = [1.0 - distance.cosine(emb[i], emb[j]) for i, j, _ in pairs]
    np.testing.assert_allclose(sims, expected, rtol=1e-12)
    ref = stats.spearmanr(expected, [r for _, _, r in pairs]).statistic
    assert similarity_spearman(emb, pairs) == pytest.approx(ref, abs=1e-12)


def test_pair_index_out_of_range_is_an_error() -> None:
    with pytest.raises(ConfigError, match="indexes document 3"):
        pair_similarities(np.ones((3, 2)), [(0, 3, 1.0)])


def test_probe_accuracy_equals_sklearn_decision() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8))
    y = x @ rng.normal(size=8) + 0.5 * rng.normal(size=300) > 0
    probe = fit_probe(x[:200], y[:200])
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=0).fit(x[:200], y[:200])
    assert probe.accuracy(x[200:], y[200:]) == pytest.approx(float(np.mean(clf.predict(x[200:]) == y[200:])))
    # the probe learns a noisy linear rule well above chance, and deterministically
    assert probe.accuracy(x[200:], y[200:]) > 0.8
    again = fit_probe(x[:200], y[:200])
    np.testing.assert_array_equal(again.weights, probe.weights)


def test_probe_needs_both_classes() -> None:
    with pytest.raises(ConfigError, match="both positive and negative"):
        fit_probe(np.ones((4, 2)), [True, True, True, True])


def test_error_accumulator_streams_like_one_pass() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(50, 16))
    got = ref + 0.01 * rng.normal(size=(50, 16))
    acc = ErrorAccumulator()
    for lo in range(0, 50, 7):
        acc.add(got[lo : lo + 7], ref[lo : lo + 7])
    expected = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert acc.relative_error == pytest.approx(expected, rel=1e-12)
    assert acc.max_abs == pytest.approx(np.max(np.abs(got - ref)))
    assert acc.count == 50 * 16
