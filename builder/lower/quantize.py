"""Lowering stage: the one-call composition analyze -> plan -> lower (-> bias correction) used by the CLI and
the benchmarks.

Each step is also available on its own (:func:`builder.plan.plan`, :func:`builder.lower.pipeline.lower`,
:func:`builder.lower.bias_correction.correct_biases`). Bias correction is the one step that needs data: when the
plan asks for it, the calibration feeds must be passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import onnx

from builder.graph.report import GraphReport
from builder.lower.checks import check_model
from builder.lower.pipeline import QuantizedModel, lower, plugin_pass
from builder.plan.artifact import QuantPlan
from builder.plan.flops import gemm_flops
from builder.plan.planner import plan
from builder.recipes.loader import load_recipe
from builder.recipes.model import Recipe
from builder.recipes.overrides import check_overrides, parse_fallbacks
from calib.errors import ConfigError
from calib.range_table import RangeTable

Feed = Mapping[str, Any]
PLAN_SEQ_LEN = 128  # sequence length at which the plan's INT8 GEMM-FLOP share is counted


def resolve_recipe(recipe: Recipe | str, report: GraphReport, fallbacks: Sequence[str] = ()) -> Recipe:
    """A preset name, YAML path or Recipe, with ``--fallback`` overrides appended (checked against the model)."""
    base = load_recipe(recipe) if isinstance(recipe, str) else recipe
    overrides = parse_fallbacks(tuple(fallbacks))
    check_overrides(overrides, report)
    return base.with_rules(tuple(o.to_rule() for o in overrides))


def quantize(model: onnx.ModelProto, recipe: Recipe | str, ranges: RangeTable | Sequence[RangeTable], *,
             report: GraphReport | None = None, outliers: Any = None, fallbacks: Sequence[str] = (),
             variant: str = "portable", calibration_feeds: Iterable[Feed] | None = None) -> QuantizedModel:
    """Plan and lower ``model`` under ``recipe`` (a preset name, YAML path or Recipe).

    ``calibration_feeds`` (the calibration batches, never evaluation data) are needed when the recipe sets
    ``bias_correction``; without that setting they are not used.
    """
    if report is None:
        from builder.graph.analyze import analyze

        report = analyze(model, name=model.graph.name or "model")
    resolved = resolve_recipe(recipe, report, fallbacks)
    quant_plan = plan(report, resolved, ranges, outliers=outliers, flops=gemm_flops(model, report, PLAN_SEQ_LEN),
                      seq_len=PLAN_SEQ_LEN)
    return lower_with_correction(model, quant_plan, variant, calibration_feeds)


def lower_with_correction(model: onnx.ModelProto, quant_plan: QuantPlan, variant: str = "portable",
                          calibration_feeds: Iterable[Feed] | None = None) -> QuantizedModel:
    """:func:`lower`, then the bias correction the plan asks for (on the portable graph, before plugin fusion)."""
    nodes = quant_plan.bias_correction_nodes
    if not nodes:
        return lower(model, quant_plan, variant)
    if calibration_feeds is None:
        raise ConfigError(f"recipe {quant_plan.recipe_name!r} sets bias_correction for {len(nodes)} GEMMs, which "
                          "needs the calibration data; pass the calibration feeds (or drop the setting)")
    from builder.lower.bias_correction import correct_biases

    portable = lower(model, quant_plan, "portable")
    corrected = correct_biases(model, portable.model, calibration_feeds, nodes=nodes)
    check_model(corrected, "bias_correction")
    if variant == "plugin":
        corrected = plugin_pass(corrected)
        check_model(corrected, "plugins")
    return replace(portable, model=corrected, variant=variant)
