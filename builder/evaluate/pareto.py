"""Evaluation stage: the Pareto front of (cost, accuracy) points, shared by the sweep and search reports."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (in order) of the points no other point dominates: lower or equal cost and higher or equal
    accuracy, one of them strictly; ``points`` as (cost, accuracy). Equal points do not dominate each other."""
    front = []
    for i, (cost, acc) in enumerate(points):
        dominated = any((c <= cost and a >= acc) and (c < cost or a > acc) for j, (c, a) in enumerate(points)
                        if j != i)
        if not dominated:
            front.append(i)
    return front
