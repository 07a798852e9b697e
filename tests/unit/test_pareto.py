"""The Pareto front shared by the sweep and search reports (builder.evaluate.pareto)."""

from __future__ import annotations

from builder.evaluate.pareto import pareto_front


def test_dominated_points_leave_the_front() -> None:
    # (cost, accuracy): the second beats the first on both; the third is the most accurate; the fourth costs least
    assert pareto_front([(60.0, 0.990), (55.0, 0.995), (70.0, 0.999), (50.0, 0.900)]) == [1, 2, 3]


def test_equal_points_stay_and_a_tie_on_one_axis_is_decided_by_the_other() -> None:
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]
    assert pareto_front([(1.0, 0.5), (1.0, 0.6)]) == [1]  # same cost, more accurate
    assert pareto_front([(2.0, 0.6), (1.0, 0.6)]) == [1]  # same accuracy, cheaper


def test_empty_and_single() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 0.1)]) == [0]
