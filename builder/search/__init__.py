"""Precision search stage: the most INT8 GEMM work whose model still meets an accuracy budget.

    precision_search(model, report, statistics, full_slice, quick_slice, request) -> SearchOutcome

Built on the library pipeline (one Statistics, plan and lower per candidate) and on the model-agnostic
evaluation (the survey's pooling or logits, metrics held against FP32). Modules: :mod:`~builder.search.budget`
(the budget and its metrics), :mod:`~builder.search.units` (what falls back together; the recipe of a choice),
:mod:`~builder.search.scoring` (the held-out slice and its FP32 reference), :mod:`~builder.search.segments`
(candidates run block by block with a prefix cache), :mod:`~builder.search.evaluator`,
:mod:`~builder.search.search` (the algorithm), :mod:`~builder.search.driver` (the composition),
:mod:`~builder.search.report` and :mod:`~builder.search.journal` (what the CLI writes; resuming).
"""

from builder.search.budget import Budget, ModelKind, parse_budget
from builder.search.driver import SearchOutcome, SearchRequest, precision_search
from builder.search.search import Measurement, Point, SearchOptions, SearchResult, search

__all__ = [
    "Budget",
    "Measurement",
    "ModelKind",
    "Point",
    "SearchOptions",
    "SearchOutcome",
    "SearchRequest",
    "SearchResult",
    "parse_budget",
    "precision_search",
    "search",
]
