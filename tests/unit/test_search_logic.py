"""The precision search's logic on a model whose answer is known (no ONNX: an additive error model).

Each unit adds its own error to ``1 - cosine`` when it runs in INT8 (small separate errors add up), so the
best answer -- the most GEMM work in INT8 whose summed error stays within the budget, then the fewest islands
-- is found independently by trying every subset.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from builder.graph.report import Role
from builder.search.budget import ModelKind, parse_budget
from builder.search.search import (
    Measurement,
    Phase,
    Point,
    SearchOptions,
    SearchResult,
    Stop,
    search,
    sensitivity_order,
)
from builder.search.units import Unit, islands
from calib.errors import ConfigError

# (key, GEMM work, error in INT8); zero-work units stand for LayerNorm / softmax outputs
SPEC = (
    ("layer.0.attn_ln", 0.0, 0.00002),
    ("layer.0.q_proj", 4.0, 0.00001),
    ("layer.0.attn_softmax", 0.0, 0.00030),
    ("layer.0.fc1", 16.0, 0.00020),
    ("layer.0.fc2", 16.0, 0.00050),
    ("layer.1.q_proj", 4.0, 0.00040),
    ("layer.1.attn_pv", 1.0, 0.00035),
    ("layer.1.fc1", 16.0, 0.00015),
    ("layer.1.fc2", 16.0, 0.00045),
    ("layer.1.ffn_ln", 0.0, 0.00001),
)


def _units(spec: Sequence[tuple[str, float, float]] = SPEC) -> tuple[Unit, ...]:
    units = []
    for position, (key, work, _) in enumerate(spec):
        layer, role = key.split(".")[1:]
        units.append(Unit(key=key, layer=int(layer), roles=(Role(role),), nodes=(f"n{position}",), gemm_flops=work,
                          position=position))
    return tuple(units)


class Additive:
    """cosine = 1 - sum of the INT8 units' errors; the quick slice sees the same errors scaled by 1.1."""

    def __init__(self, spec: Sequence[tuple[str, float, float]] = SPEC) -> None:
        self.work = {k: w for k, w, _ in spec}
        self.error = {k: e for k, _, e in spec}
        self.calls: list[tuple[frozenset[str], bool]] = []

    def measure(self, fallback: frozenset[str], *, quick: bool) -> Measurement:
        self.calls.append((fallback, quick))
        int8 = [k for k in self.work if k not in fallback]
        error = sum(self.error[k] for k in int8) * (1.1 if quick else 1.0)
        share = sum(self.work[k] for k in int8) / sum(self.work.values())
        return Measurement(share=share, metrics={"cosine": 1.0 - error}, samples=16 if quick else 64, seconds=0.0)


def _known_answer(spec: Sequence[tuple[str, float, float]], allowed: float) -> frozenset[str]:
    """Every subset: most INT8 work within the error allowance, then fewest islands, then least error."""
    units = _units(spec)
    keys = [k for k, _, _ in spec]
    best: tuple[float, int, float] | None = None
    answer: frozenset[str] = frozenset()
    for size in range(len(keys) + 1):
        for kept in itertools.combinations(keys, size):
            error = sum(e for k, _, e in spec if k in kept)
            if error > allowed + 1e-15:
                continue
            fallback = frozenset(keys) - frozenset(kept)
            rank = (-sum(w for k, w, _ in spec if k in kept), islands(units, fallback), error)
            if best is None or rank < best:
                best, answer = rank, fallback
    return answer


def _run(budget: str = "cosine>=0.9989", **kwargs: object) -> tuple[SearchResult, Additive]:
    model = Additive()
    result = search(_units(), parse_budget(budget, ModelKind.SENTENCE), 1.0, model, **kwargs)  # type: ignore[arg-type]
    return result, model


def test_the_search_finds_the_known_optimum() -> None:
    result, model = _run()
    expected = _known_answer(SPEC, 0.0011)
    assert result.best is not None and frozenset(result.best.fallback) == expected
    assert result.stop == Stop.DONE and result.feasible is True
    assert result.best.value("cosine") >= 0.9989
    assert result.new_evaluations == len(model.calls) == len(result.points)
    assert {p.phase for p in result.points} >= {"base", "floor", "sensitivity", "bisection", "refine", "tidy"}


def test_the_sensitivity_order_is_damage_per_gemm_work() -> None:
    result, _ = _run()
    gemm = [(k, e * 1.1 / w) for k, w, e in SPEC if w > 0]  # measured on the quick slice: errors x 1.1
    expected = tuple(k for k, _ in sorted(gemm, key=lambda kv: (kv[1], [k for k, _, _ in SPEC].index(kv[0]))))
    assert result.order == expected
    for key, _, error in SPEC:
        if key in result.sensitivity:
            assert result.sensitivity[key] == pytest.approx(1.1 * error, abs=1e-12)
    assert sensitivity_order(_units(), {"layer.0.q_proj": 0.0, "layer.0.fc1": 1.0, "layer.0.fc2": 1.0,
                                        "layer.1.q_proj": -1.0, "layer.1.attn_pv": 0.5, "layer.1.fc1": 2.0,
                                        "layer.1.fc2": 3.0})[:2] == ("layer.0.q_proj", "layer.1.q_proj")


def test_a_budget_the_base_meets_takes_one_evaluation() -> None:
    result, model = _run("cosine>=0.99")
    assert len(model.calls) == 1 and result.best is not None and result.best.fallback == ()
    assert result.best.share == 1.0


def test_an_impossible_budget_ends_with_the_closest_point() -> None:
    class Islands(Additive):  # every 16-bit unit costs a little error too, so even the floor misses cosine >= 1
        def measure(self, fallback: frozenset[str], *, quick: bool) -> Measurement:
            m = super().measure(fallback, quick=quick)
            return Measurement(share=m.share, metrics={"cosine": m.metrics["cosine"] - 1e-6 * len(fallback)},
                               samples=m.samples, seconds=0.0)

    budget = parse_budget("cosine>=1", ModelKind.SENTENCE)
    result = search(_units(), budget, 1.0, Islands())
    assert result.best is None and result.feasible is False
    assert [p.phase for p in result.points] == ["base", "floor"]
    assert result.closest.phase == "floor"
    assert budget.shortfall(result.closest.value("cosine"), 1.0) == pytest.approx(1e-5, rel=1e-6)


def test_the_search_is_deterministic() -> None:
    first, _ = _run()
    second, _ = _run()
    assert first.points == second.points and first.best == second.best


def test_a_resumed_search_follows_the_same_path() -> None:
    whole, _ = _run()
    cut, _ = _run(options=SearchOptions(max_evals=7))
    assert cut.stop == Stop.MAX_EVALS and cut.new_evaluations == 7 and len(cut.points) == 7
    known = {p.key: p for p in cut.points}
    resumed, model = _run(known=known)
    assert [(p.key, p.measurement) for p in resumed.points] == [(p.key, p.measurement) for p in whole.points]
    assert [p.reused for p in resumed.points] == [i < 7 for i in range(len(whole.points))]
    assert len(model.calls) == len(whole.points) - 7 == resumed.new_evaluations
    assert resumed.best is not None and whole.best is not None and resumed.best.key == whole.best.key


def test_the_time_limit_stops_before_the_next_evaluation() -> None:
    ticks = iter(range(1000))
    result, model = _run(options=SearchOptions(time_limit_s=3.5), clock=lambda: float(next(ticks)))
    assert result.stop == Stop.TIME_LIMIT and len(model.calls) == 3
    assert result.best is not None and result.best.phase == Phase.FLOOR.value  # the only point meeting it so far


def test_a_search_stopped_before_any_point_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="allow at least one evaluation"):
        _run(options=SearchOptions(max_evals=0))


def test_a_recipe_without_int8_nodes_has_nothing_to_search() -> None:
    with pytest.raises(ConfigError, match="nothing to search"):
        search((), parse_budget("cosine>=0.9", ModelKind.SENTENCE), 1.0, Additive())


def test_points_round_trip_through_json() -> None:
    import msgspec

    result, _ = _run()
    for point in result.points:
        assert msgspec.json.decode(msgspec.json.encode(point), type=Point) == point
