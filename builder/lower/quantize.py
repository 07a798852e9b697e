"""Lowering stage: the one-call composition analyze -> plan -> lower used by the CLI and the benchmarks.

Each step is also available on its own (:func:`builder.plan.plan`, :func:`builder.lower.pipeline.lower`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx

from builder.graph.report import GraphReport
from builder.lower.pipeline import QuantizedModel, lower
from builder.plan.flops import gemm_flops
from builder.plan.planner import plan
from builder.recipes.loader import load_recipe
from builder.recipes.model import Recipe
from builder.recipes.overrides import check_overrides, parse_fallbacks
from calib.range_table import RangeTable


def resolve_recipe(recipe: Recipe | str, report: GraphReport, fallbacks: Sequence[str] = ()) -> Recipe:
    """A preset name, YAML path or Recipe, with ``--fallback`` overrides appended (checked against the model)."""
    base = load_recipe(recipe) if isinstance(recipe, str) else recipe
    overrides = parse_fallbacks(tuple(fallbacks))
    check_overrides(overrides, report)
    return base.with_rules(tuple(o.to_rule() for o in overrides))


def quantize(model: onnx.ModelProto, recipe: Recipe | str, ranges: RangeTable | Sequence[RangeTable], *,
             report: GraphReport | None = None, outliers: Any = None, fallbacks: Sequence[str] = (),
             variant: str = "portable", seq_len: int = 128) -> QuantizedModel:
    """Plan and lower ``model`` under ``recipe`` (a preset name, YAML path or Recipe)."""
    if report is None:
        from builder.graph.analyze import analyze

        report = analyze(model, name=model.graph.name or "model")
    resolved = resolve_recipe(recipe, report, fallbacks)
    quant_plan = plan(report, resolved, ranges, outliers=outliers, flops=gemm_flops(model, report, seq_len),
                      seq_len=seq_len)
    return lower(model, quant_plan, variant)
