"""Precision search: the library entry point that composes units, evaluator, search, presets and the final check.

    precision_search(model, report, statistics, full, quick, request)  ->  SearchOutcome

In memory and deterministic: the caller (builder.cli.search) owns paths, locks, the journal of recorded points
(passed back in as ``known`` to resume) and the progress bar (``on_point``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from builder.graph.report import GraphReport
from builder.plan.artifact import QuantPlan
from builder.recipes.model import Precision, Recipe
from builder.search.budget import Budget
from builder.search.evaluator import CandidateEvaluator
from builder.search.scoring import SliceScorer
from builder.search.search import Phase, Point, SearchOptions, SearchResult, search
from builder.search.units import Granularity, Unit, search_units
from calib.errors import BuildError, ToolkitError
from calib.statistics import Statistics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SearchRequest:
    """What to search: the base recipe, the budget, the 16-bit type, the unit size, the limits, the presets."""

    base: Recipe
    budget: Budget
    precision: Precision = Precision.FP16
    granularity: Granularity = Granularity.LAYER_ROLE
    options: SearchOptions = field(default_factory=SearchOptions)
    presets: tuple[Recipe, ...] = ()  # evaluated once on the same slice (markers on the Pareto plot)
    flagged: Sequence[int] | None = None
    cache_bytes: int = 1 << 30
    feeds: Iterable[Mapping[str, Any]] | None = None  # calibration batches, for recipes with bias correction


@dataclass(frozen=True, kw_only=True)
class SearchOutcome:
    """The search, the recipe of its answer (the best point, else the closest) and the preset points."""

    result: SearchResult
    units: tuple[Unit, ...]
    recipe: Recipe
    plan: QuantPlan
    answer: Point
    reference_metrics: dict[str, float]
    presets: tuple[Point, ...]
    skipped_presets: dict[str, str]
    cache: dict[str, int]


def preset_key(recipe: Recipe) -> str:
    from builder.recipes.loader import recipe_to_yaml
    from calib.artifact_io import sha256_text

    return f"preset:{recipe.name}:{sha256_text(recipe_to_yaml(recipe))[:16]}"


def _presets(evaluator: CandidateEvaluator, recipes: Sequence[Recipe], known: Mapping[str, Point], start: int,
             on_point: Callable[[Point], None]) -> tuple[list[Point], dict[str, str]]:
    points: list[Point] = []
    skipped: dict[str, str] = {}
    for recipe in recipes:
        key = preset_key(recipe)
        old = known.get(key)
        try:
            measurement = old.measurement if old is not None else evaluator.measure_recipe(recipe)
        except ToolkitError as exc:  # a preset for another kind of model, or one needing an absent plugin
            skipped[recipe.name] = str(exc)
            logger.info("preset %s skipped: %s", recipe.name, exc)
            continue
        point = Point(index=start + len(points), phase=Phase.PRESET.value, key=key, fallback=(), islands=0,
                      measurement=measurement, reused=old is not None, label=recipe.name)
        points.append(point)
        on_point(point)
    return points, skipped


def check_recipe_plan(recipe: Recipe, plan: QuantPlan, units: Sequence[Unit], fallback: Iterable[str],
                      precision: Precision) -> None:
    """The recipe's plan puts exactly the ``fallback`` units in ``precision`` and every other unit in INT8."""
    chosen = set(fallback)
    for unit in units:
        want = precision if unit.key in chosen else Precision.INT8
        for node in unit.nodes:
            got = plan.node(node).precision
            if got != want:
                raise BuildError(f"recipe {recipe.name!r} puts node {node!r} in {got.value}, but the search chose "
                                 f"{want.value} for unit {unit.key!r}: its fallback rules do not reproduce the plan")


def round_trip(recipe: Recipe) -> Recipe:
    """``recipe`` written as YAML and read back (what ``quantize --recipe file.yaml`` will read)."""
    from builder.recipes.loader import recipe_from_yaml, recipe_to_yaml

    return recipe_from_yaml(recipe_to_yaml(recipe), where=f"search recipe {recipe.name}")


def precision_search(model: onnx.ModelProto, report: GraphReport, statistics: Statistics,
                     full: SliceScorer, quick: SliceScorer, request: SearchRequest, *,
                     known: Mapping[str, Point] | None = None,
                     on_point: Callable[[Point], None] | None = None) -> SearchOutcome:
    """Search ``request.base``'s INT8 units for the most INT8 GEMM work meeting ``request.budget`` on ``full``."""
    from builder.pipeline import plan_model

    known = known or {}
    notify = on_point or (lambda p: None)
    base_plan = plan_model(model, report, request.base, statistics, flagged=request.flagged)
    units = search_units(report, base_plan, request.granularity)
    evaluator = CandidateEvaluator(model=model, report=report, statistics=statistics, base=request.base,
                                   units=units, full=full, quick=quick, precision=request.precision,
                                   budget_text=request.budget.text, flagged=request.flagged, feeds=request.feeds,
                                   cache_bytes=request.cache_bytes)
    reference = full.reference_metrics()
    result = search(units, request.budget, reference[request.budget.metric.name], evaluator,
                    options=request.options, known=known, on_point=notify)
    answer = result.best or result.closest
    recipe = round_trip(evaluator.recipe(answer.fallback))
    plan = plan_model(model, report, recipe, statistics, flagged=request.flagged)
    check_recipe_plan(recipe, plan, units, answer.fallback, request.precision)
    if abs(plan.int8_gemm_flop_share - answer.share) > 1e-12:
        raise BuildError(f"the recipe read back from YAML plans an INT8 share of {plan.int8_gemm_flop_share:.6f}, "
                         f"the search measured {answer.share:.6f}")
    presets, skipped = _presets(evaluator, request.presets, known, len(result.points), notify)
    return SearchOutcome(result=result, units=units, recipe=recipe, plan=plan, answer=answer,
                         reference_metrics=reference, presets=tuple(presets), skipped_presets=skipped,
                         cache=evaluator.cache_stats())
