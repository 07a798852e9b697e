"""Precision search (evaluation side): plan, lower and measure one candidate from the one calibration.

A candidate is the base recipe plus fallback rules (:func:`builder.search.units.search_recipe`). It is planned
from the same Statistics as every other candidate (no second calibration), lowered by the library pipeline
(builder.pipeline.quantize_planned) and run as a chain of segments (:mod:`builder.search.segments`), so only
the blocks after its longest cached prefix run. The two slices (full and quick) keep separate state caches.
Its integer weights come from a cache across candidates (:mod:`builder.search.weightcache`): only GEMMs whose
weight entry or input quantization changed are quantized again, which makes data-aware weights (OPTQ) affordable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from builder.graph.report import GraphReport, Role
from builder.plan.artifact import QuantPlan
from builder.recipes.model import Precision, Recipe
from builder.search.scoring import SliceScorer
from builder.search.search import Measurement
from builder.search.segments import StateCache, run_chain, split_model
from builder.search.units import Unit, search_recipe
from builder.search.weightcache import WeightCache, cacheable
from calib.statistics import Statistics

logger = logging.getLogger(__name__)

STREAM_ROLES = (Role.ATTN_RESIDUAL, Role.FFN_RESIDUAL)


def stream_cuts(report: GraphReport) -> tuple[str, ...]:
    """The residual-stream tensors (outputs of the residual Adds), in graph order."""
    return tuple(a.outputs[0] for a in report.assignments if a.role in STREAM_ROLES and a.outputs)


@dataclass
class CandidateEvaluator:
    """Measures candidates of one search (see the module docstring); ``cache_bytes`` 0 turns the prefix cache off."""

    model: onnx.ModelProto
    report: GraphReport
    statistics: Statistics
    base: Recipe
    units: tuple[Unit, ...]
    full: SliceScorer
    quick: SliceScorer
    precision: Precision = Precision.FP16
    budget_text: str = ""
    flagged: Sequence[int] | None = None
    feeds: Iterable[Mapping[str, Any]] | None = None  # calibration batches, for recipes with bias correction
    cache_bytes: int = 1 << 30
    weight_cache_bytes: int = 1 << 30  # quantized weights kept across candidates (0: every candidate quantizes all)
    caches: dict[bool, StateCache] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.caches = {quick: StateCache(max_bytes=self.cache_bytes) for quick in (False, True)}
        self.weight_cache = WeightCache(self.model, self.statistics, max_bytes=self.weight_cache_bytes)
        self.cuts = stream_cuts(self.report)
        if self.feeds is not None:
            self.feeds = list(self.feeds)

    def recipe(self, fallback: Iterable[str]) -> Recipe:
        """The base recipe with ``fallback`` units in 16 bits."""
        return search_recipe(self.base, self.report, self.units, frozenset(fallback), self.precision,
                             self.budget_text)

    def measure(self, fallback: frozenset[str], *, quick: bool) -> Measurement:
        return self.measure_recipe(self.recipe(fallback), quick=quick)

    def measure_recipe(self, recipe: Recipe, *, quick: bool = False) -> Measurement:
        """Plan, lower and evaluate ``recipe`` on the full (or quick) slice."""
        from builder.pipeline import plan_model

        started = time.perf_counter()
        plan = plan_model(self.model, self.report, recipe, self.statistics, flagged=self.flagged)
        return self.measure_model(self.lowered(plan, recipe), plan.int8_gemm_flop_share, quick=quick,
                                  started=started)

    def lowered(self, plan: QuantPlan, recipe: Recipe) -> onnx.ModelProto:
        """The portable Q/DQ graph of ``plan``, its weights from the weight cache where the plan allows."""
        from builder.lower.pipeline import lower
        from builder.pipeline import quantize_planned

        if self.weight_cache_bytes > 0 and cacheable(plan):
            return lower(self.model, plan, self.weight_cache.weights(plan), "portable").model
        return quantize_planned(self.model, plan, self.statistics, feeds=self.feeds if
                                recipe.uses_bias_correction else None).model.model

    def measure_model(self, model: onnx.ModelProto, share: float, *, quick: bool = False,
                      started: float | None = None) -> Measurement:
        """Evaluate a lowered ``model`` (its INT8 share given) on the full (or quick) slice."""
        started = time.perf_counter() if started is None else started
        scorer = self.quick if quick else self.full
        segments = split_model(model, self.cuts, scorer.fetch)
        run = run_chain(segments, scorer.feeds, self.caches[quick])
        metrics = scorer.metrics(run.outputs)
        return Measurement(share=share, metrics=metrics, samples=scorer.data.samples,
                           seconds=round(time.perf_counter() - started, 3), segments_run=run.segments_run,
                           segments_total=run.segments_total)

    def cache_stats(self) -> dict[str, int]:
        """Prefix-cache hits, misses and bytes held, both slices together, and the weight cache's."""
        caches = self.caches.values()
        w = self.weight_cache
        return {"hits": sum(c.hits for c in caches), "misses": sum(c.misses for c in caches),
                "bytes": sum(c.bytes for c in caches), "weight_hits": w.hits, "weight_misses": w.misses,
                "weight_bytes": w.bytes}
