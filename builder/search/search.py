"""Precision search: the most INT8 GEMM work whose model still meets an accuracy budget.

The base recipe decides which nodes may run in INT8; the search only chooses which of its units (see
:mod:`builder.search.units`) fall back to 16 bits. Steps, each a sequence of candidate evaluations:

    base         nothing in 16 bits                      met: done (share 100% of what the recipe quantizes)
    floor        every unit in 16 bits                   not met: the budget is impossible for this recipe
    sensitivity  for each unit u: only u in INT8         damage d_u = floor's metric - this metric (quick slice)
    order        GEMM units by d_u / (GEMM work of u)    cheapest damage per INT8 multiply-accumulate first
    bisection    keep the first K of the order in INT8   the largest K that meets the budget (log2 n steps);
                 units without GEMM work (LayerNorm and softmax outputs) stay in 16 bits, where they cost no share
    refine       each 16-bit GEMM unit, the biggest first, back in INT8 when the budget holds
    tidy         the units without GEMM work, least damage first: bisection again, then one by one, so that
                 fewer islands remain

Quantizing one unit at a time from the floor (instead of falling back one unit at a time from the base)
measures each unit's own error; small errors of separate units add up roughly (1 - cosine grows like the summed
squared error), so the order predicts well which set meets the budget, and bisection corrects the prediction
with measurements -- the sensitivity-ordered search of mixed-precision methods such as HAWQ (Dong et al. 2019,
arXiv 1905.03696, section 3), here measured on the model's output instead of estimated from the Hessian. The
one-by-one steps skip a unit whose predicted damage (its d_u, scaled by how the summed d of the current INT8
units compares with their measured damage) exceeds 1.5 x the room left under the budget.

Everything is deterministic: ties are broken by graph order, and the candidates depend only on measurements.
Measurements already made (a resumed run) are looked up instead of repeated, so a resumed search follows
the same path. ``max_evals`` and ``time_limit_s`` stop the search early with the best point so far.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from builder.search.budget import Budget
from builder.search.units import Unit, islands
from calib.schema import Schema

logger = logging.getLogger(__name__)

EPSILON_SHARE = 1e-12


class Phase(StrEnum):
    BASE = "base"
    FLOOR = "floor"
    SENSITIVITY = "sensitivity"
    BISECTION = "bisection"
    REFINE = "refine"
    TIDY = "tidy"
    PRESET = "preset"
    FINAL = "final"


class Measurement(Schema, frozen=True, kw_only=True):
    """What evaluating one candidate gave: its INT8 share, the metrics on the slice, and its cost."""

    share: float  # INT8 GEMM-FLOP share of the candidate's plan
    metrics: dict[str, float]
    samples: int  # sentences or windows measured
    seconds: float  # planning, lowering and evaluation
    segments_run: int = 0  # segments evaluated (the rest came from the prefix cache)
    segments_total: int = 0


class Point(Schema, frozen=True, kw_only=True):
    """One evaluated candidate (a row of the candidate table)."""

    index: int  # evaluation order within the search
    phase: str
    key: str  # the memo key: slice ("full" / "quick") and the sorted fallback units
    fallback: tuple[str, ...]  # units in 16 bits, in graph order
    islands: int
    measurement: Measurement
    reused: bool = False  # taken from an earlier run's record
    label: str = ""  # preset name (preset rows)

    @property
    def share(self) -> float:
        return self.measurement.share

    def value(self, metric: str) -> float:
        return self.measurement.metrics[metric]


class Evaluator(Protocol):
    """Measures a candidate given by its 16-bit units; ``quick`` measures on the smaller sensitivity slice."""

    def measure(self, fallback: frozenset[str], *, quick: bool) -> Measurement: ...


class Stop(StrEnum):
    DONE = "done"
    MAX_EVALS = "max-evals"
    TIME_LIMIT = "time-limit"


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    max_evals: int | None = None  # new evaluations in this run (recorded ones are free)
    time_limit_s: float | None = None
    refine: bool = True
    tidy: bool = True


@dataclass(frozen=True, kw_only=True)
class SearchResult:
    """The search's outcome: every point, the best one and why the search stopped."""

    points: tuple[Point, ...]
    best: Point | None  # best point meeting the budget (None: none found)
    closest: Point  # best metric among the full-slice points (the answer when nothing meets the budget)
    reference: float  # FP32 value of the budget's metric
    stop: Stop
    feasible: bool | None  # False: even the floor misses the budget; None: not known (stopped early)
    sensitivity: dict[str, float]  # unit -> damage (quick slice; positive = worse)
    order: tuple[str, ...]  # GEMM units, first kept in INT8 first
    new_evaluations: int
    seconds: float


@dataclass
class _Findings:
    feasible: bool | None = None
    sensitivity: dict[str, float] = field(default_factory=dict)
    order: tuple[str, ...] = ()


class _Stopped(Exception):
    def __init__(self, why: Stop) -> None:
        super().__init__(why.value)
        self.why = why


@dataclass
class _Run:
    """The mutable state of one search run."""

    units: Sequence[Unit]
    budget: Budget
    reference: float
    evaluator: Evaluator
    options: SearchOptions
    known: Mapping[str, Point]
    on_point: Callable[[Point], None]
    clock: Callable[[], float]
    started: float
    points: list[Point] = field(default_factory=list)
    seen: dict[str, Point] = field(default_factory=dict)
    new: int = 0

    def key(self, fallback: frozenset[str], quick: bool) -> str:
        ordered = [u.key for u in self.units if u.key in fallback]
        return ("quick:" if quick else "full:") + ",".join(ordered)

    def measure(self, fallback: frozenset[str], phase: Phase, quick: bool = False) -> Point:
        key = self.key(fallback, quick)
        if key in self.seen:
            return self.seen[key]
        old = self.known.get(key)
        if old is None:
            if self.options.max_evals is not None and self.new >= self.options.max_evals:
                raise _Stopped(Stop.MAX_EVALS)
            limit = self.options.time_limit_s
            if limit is not None and self.clock() - self.started >= limit:
                raise _Stopped(Stop.TIME_LIMIT)
            measurement = self.evaluator.measure(fallback, quick=quick)
            self.new += 1
        else:
            measurement = old.measurement
        point = Point(index=len(self.points), phase=phase.value, key=key,
                      fallback=tuple(u.key for u in self.units if u.key in fallback),
                      islands=islands(self.units, fallback), measurement=measurement, reused=old is not None)
        self.points.append(point)
        self.seen[key] = point
        self.on_point(point)
        logger.info("%s %s: share %.1f%%, %s %.6g%s", phase.value, key[:80], 100 * measurement.share,
                    self.budget.metric.name, measurement.metrics[self.budget.metric.name],
                    " (recorded)" if old is not None else "")
        return point

    def met(self, point: Point) -> bool:
        return self.budget.met(point.value(self.budget.metric.name), self.reference)

    def room(self, point: Point) -> float:
        """How far ``point`` is inside the budget, in the metric's units (0 at the bound)."""
        bound = self.budget.threshold(self.reference)
        value = point.value(self.budget.metric.name)
        return value - bound if self.budget.metric.higher_is_better else bound - value

    def damage(self, point: Point, floor: Point) -> float:
        """How much worse than the floor ``point`` is (positive: worse), in the metric's units."""
        name = self.budget.metric.name
        diff = floor.value(name) - point.value(name)
        return diff if self.budget.metric.higher_is_better else -diff


def rank(points: Iterable[Point], budget: Budget, reference: float) -> tuple[Point | None, Point]:
    """The best full-slice point meeting the budget (most INT8 share, then fewest islands, then best metric) and
    the point with the best metric (nearest the budget)."""
    name = budget.metric.name
    full = [p for p in points if p.key.startswith("full:")]
    assert full, "rank needs at least one full-slice point"
    sign = 1.0 if budget.metric.higher_is_better else -1.0
    met = [p for p in full if budget.met(p.value(name), reference)]
    best = min(met, key=lambda p: (-round(p.share, 12), p.islands, -sign * p.value(name), p.index), default=None)
    closest = min(full, key=lambda p: (-sign * p.value(name), -p.share, p.index))
    return best, closest


def sensitivity_order(units: Sequence[Unit], damage: Mapping[str, float]) -> tuple[str, ...]:
    """GEMM units, cheapest damage per unit of GEMM work first (ties: graph order)."""
    gemm = [u for u in units if u.gemm_flops > 0]
    return tuple(u.key for u in sorted(gemm, key=lambda u: (max(damage[u.key], 0.0) / u.gemm_flops, u.position)))


def _sensitivity(run: _Run, units: Sequence[Unit], every: frozenset[str]) -> dict[str, float]:
    floor = run.measure(every, Phase.SENSITIVITY, quick=True)
    damage = {}
    for unit in sorted(units, key=lambda u: -u.position):  # deepest first: each shares the floor's prefix
        damage[unit.key] = run.damage(run.measure(every - {unit.key}, Phase.SENSITIVITY, quick=True), floor)
    return damage


def _bisect(run: _Run, start: frozenset[str], order: Sequence[str], phase: Phase) -> frozenset[str]:
    """``start`` (meeting the budget) less the longest prefix of ``order`` that still meets it (to INT8)."""

    def fallback(k: int) -> frozenset[str]:
        return start - frozenset(order[:k])

    if not order or run.met(run.measure(fallback(len(order)), phase)):
        return fallback(len(order))
    lo, hi = 0, len(order)  # fallback(lo) meets the budget, fallback(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if run.met(run.measure(fallback(mid), phase)):
            lo = mid
        else:
            hi = mid
    return fallback(lo)


def _greedy(run: _Run, current: frozenset[str], tries: Sequence[str], damage: Mapping[str, float], phase: Phase,
            floor: Point) -> frozenset[str]:
    """Try each unit of ``tries`` back in INT8; keep it when the budget holds.

    A unit whose predicted damage exceeds 1.5 x the room left is not tried: the prediction is its quick-slice
    damage scaled by how the summed damages of the current INT8 units compare with their measured damage.
    """
    for key in tries:
        if key not in current:
            continue
        point = run.measure(current, phase)
        kept = [k for k in damage if k not in current]
        summed = sum(max(damage[k], 0.0) for k in kept)
        scale = run.damage(point, floor) / summed if summed > 0 and run.damage(point, floor) > 0 else 1.0
        room = run.room(point)
        if scale * damage[key] > 1.5 * room:
            logger.info("%s: %s not tried (predicted damage %.3g, room %.3g)", phase.value, key,
                        scale * damage[key], room)
            continue
        if run.met(run.measure(current - {key}, phase)):
            current = current - {key}
    return current


def _steps(run: _Run, result: _Findings) -> None:
    units = run.units
    every = frozenset(u.key for u in units)
    if run.met(run.measure(frozenset(), Phase.BASE)):
        return
    floor = run.measure(every, Phase.FLOOR)
    if not run.met(floor):
        result.feasible = False
        return
    result.feasible = True
    damage = _sensitivity(run, units, every)
    result.sensitivity = damage
    order = sensitivity_order(units, damage)
    result.order = order
    free = sorted((u for u in units if u.gemm_flops <= 0), key=lambda u: (damage[u.key], u.position))
    current = _bisect(run, every, order, Phase.BISECTION)
    if run.options.refine:
        by_work = sorted((u for u in units if u.gemm_flops > 0 and u.key in current),
                         key=lambda u: (-u.gemm_flops, damage[u.key], u.position))
        current = _greedy(run, current, [u.key for u in by_work], damage, Phase.REFINE, floor)
    if run.options.tidy and free:
        current = _bisect(run, current, [u.key for u in free], Phase.TIDY)
        _greedy(run, current, [u.key for u in free], damage, Phase.TIDY, floor)


def search(units: Sequence[Unit], budget: Budget, reference: float, evaluator: Evaluator, *,
           options: SearchOptions | None = None, known: Mapping[str, Point] | None = None,
           on_point: Callable[[Point], None] | None = None,
           clock: Callable[[], float] = time.monotonic) -> SearchResult:
    """Search the 16-bit units for the most INT8 GEMM work that meets ``budget`` (see the module docstring).

    ``reference`` is the FP32 value of the budget's metric on the slice; ``known`` maps memo keys to points of
    an earlier run (reused, not re-measured); ``on_point`` sees every point as it is made (to record it).
    """
    if not units:
        from calib.errors import ConfigError

        raise ConfigError("the recipe runs no node in INT8, so there is nothing to search; pick a recipe with INT8 "
                          "nodes (e.g. hero-m3 or int8-gemm)")
    run = _Run(units=units, budget=budget, reference=reference, evaluator=evaluator, options=options or
               SearchOptions(), known=known or {}, on_point=on_point or (lambda p: None), clock=clock,
               started=clock())
    result = _Findings()
    stop = Stop.DONE
    try:
        _steps(run, result)
    except _Stopped as exc:
        stop = exc.why
    if not any(p.key.startswith("full:") for p in run.points):
        raise _no_point(stop)
    best, closest = rank(run.points, budget, reference)
    return SearchResult(points=tuple(run.points), best=best, closest=closest, reference=reference, stop=stop,
                        feasible=result.feasible, sensitivity=result.sensitivity, order=result.order,
                        new_evaluations=run.new, seconds=clock() - run.started)


def _no_point(stop: Stop) -> Exception:
    from calib.errors import ConfigError

    return ConfigError(f"the search stopped ({stop.value}) before it measured a single candidate; allow at least "
                       "one evaluation (--max-evals) and a longer --time-limit")
