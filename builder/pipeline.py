"""The library pipeline: one in-memory composition of the stages.

    analyze -> calibrate -> plan -> quantize_weights -> lower      (then build_engine, evaluate)
    GraphReport  Statistics  QuantPlan   WeightSet      QuantizedModel

Weight quantizers that need statistics of their GEMM's input beyond what calibration collects (OPTQ's
Hessians) get them from a second, resumable collection pass over the same calibration batches, only for the
GEMM inputs the plan quantizes that way (:func:`calibrate_weight_inputs`; :func:`quantize_planned` runs it
when given the feeds).

The command line (one-shot, ``demo``, ``calibrate``, ``quantize``), the benchmarks, the precision search and
distributed runs call these functions; paths, locks, progress bars and reuse of earlier outputs belong to
those callers (builder.cli). Nothing here reads or writes files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from builder.graph.report import GraphReport
from builder.lower.pipeline import QuantizedModel, lower
from builder.plan.artifact import QuantPlan
from builder.plan.flops import gemm_flops
from builder.plan.planner import plan
from builder.recipes.loader import load_recipe
from builder.recipes.model import Recipe
from builder.recipes.overrides import check_overrides, parse_fallbacks
from builder.weights.stage import quantize_weights
from builder.weights.weightset import WeightSet
from calib.collect import CollectOptions, CollectResult, collect
from calib.outliers import OutlierReport, outlier_report
from calib.statistics import Statistics

Feed = Mapping[str, Any]
Label = tuple[int | None, str]
PLAN_SEQ_LEN = 128  # sequence length at which the plan's INT8 GEMM-FLOP share is counted


def analyze_model(model: onnx.ModelProto, name: str = "model") -> GraphReport:
    """Analysis stage: roles, layers and architecture."""
    from builder.graph.analyze import analyze

    return analyze(model, name=name)


def calibration_tensors(model: onnx.ModelProto, report: GraphReport) -> list[str]:
    """The activation tensors calibration observes (every tensor any recipe may quantize)."""
    from builder.graph.targets import calibration_tensors as targets

    return targets(model, report)


def calibrate(model: onnx.ModelProto, report: GraphReport, feeds: Iterable[Feed],
              options: CollectOptions | None = None) -> CollectResult:
    """Calibration stage: one Statistics for the model on ``feeds`` (serves every recipe and range method)."""
    return collect(model, feeds, calibration_tensors(model, report), options)


def tensor_labels(report: GraphReport) -> dict[str, Label]:
    """(layer, role) of every tensor the analysis names: node outputs, and ``<role>.input`` for GEMM inputs."""
    from builder.graph.targets import GEMM_ROLES

    labels: dict[str, Label] = {}
    for a in report.assignments:
        for name in a.outputs:
            labels.setdefault(name, (a.layer, a.role.value))
    for a in report.assignments:
        if a.role in GEMM_ROLES:
            for name in a.inputs:
                labels.setdefault(name, (a.layer, f"{a.role.value}.input"))
    return labels


def outliers(report: GraphReport, statistics: Statistics,
             token_name: Callable[[int], str] | None = None) -> OutlierReport:
    """The Bondarenko-style outlier report of the calibrated tensors (which layers carry outliers)."""
    return outlier_report(statistics.tensors, tensor_labels(report), token_name=token_name)


def resolve_recipe(recipe: Recipe | str, report: GraphReport, fallbacks: Sequence[str] = ()) -> Recipe:
    """A preset name, YAML path or Recipe, with ``--fallback`` overrides appended (checked against the model)."""
    base = load_recipe(recipe) if isinstance(recipe, str) else recipe
    overrides = parse_fallbacks(tuple(fallbacks))
    check_overrides(overrides, report)
    return base.with_rules(tuple(o.to_rule() for o in overrides))


def needs_flagged(recipe: Recipe) -> bool:
    """Whether the recipe selects the layers the outlier report flags."""
    return any(rule.select.flagged for rule in recipe.rules)


@dataclass(frozen=True, kw_only=True)
class Quantized:
    """What quantizing one model with one recipe produced: the plan, the weights and the lowered graph."""

    plan: QuantPlan
    weights: WeightSet
    model: QuantizedModel


def plan_model(model: onnx.ModelProto, report: GraphReport, recipe: Recipe, statistics: Statistics, *,
               flagged: Sequence[int] | None = None, seq_len: int = PLAN_SEQ_LEN,
               feeds: Sequence[Feed] | None = None, source: onnx.ModelProto | Path | None = None) -> QuantPlan:
    """Planning stage; the flagged layers come from the statistics' outlier report when the recipe needs them.
    With ``feeds``, observers the plan lacks are collected first (see :func:`plan_and_statistics`)."""
    return plan_and_statistics(model, report, recipe, statistics, flagged=flagged, seq_len=seq_len,
                               feeds=None if feeds is None else (lambda: feeds), source=source)[0]


def plan_and_statistics(model: onnx.ModelProto, report: GraphReport, recipe: Recipe, statistics: Statistics, *,
                        flagged: Sequence[int] | None = None, seq_len: int = PLAN_SEQ_LEN,
                        feeds: Callable[[], Sequence[Feed]] | None = None,
                        source: onnx.ModelProto | Path | None = None) -> tuple[QuantPlan, Statistics]:
    """The plan, and the Statistics it was made from.

    Observer kinds that calibration does not collect by default (vSPARQ's ``sparq_pairs``) are collected when an
    activation quantizer of the plan needs them: a second pass over ``feeds()`` (the batches the statistics were
    collected on; called only then) by ``source`` (what calibration ran: its file, or ``model`` when omitted).
    Without ``feeds`` that is a MissingStatistics error.
    """
    from builder.plan.planner import MissingStatistics
    from builder.weights.hessians import collect_missing

    if flagged is None and needs_flagged(recipe):
        flagged = outliers(report, statistics).flagged_layers()
    flops = gemm_flops(model, report, seq_len)
    try:
        return plan(report, recipe, statistics, flagged=flagged, flops=flops, seq_len=seq_len, model=model), statistics
    except MissingStatistics as missing:
        if feeds is None:
            raise
        statistics = collect_missing(model if source is None else source, statistics, missing.wanted, feeds())
    return plan(report, recipe, statistics, flagged=flagged, flops=flops, seq_len=seq_len, model=model), statistics


def quantize(model: onnx.ModelProto, report: GraphReport, recipe: Recipe, statistics: Statistics, *,
             variant: str = "portable", flagged: Sequence[int] | None = None,
             feeds: Iterable[Feed] | None = None, seq_len: int = PLAN_SEQ_LEN) -> Quantized:
    """Plan, quantize the weights and lower: the Q/DQ graph of ``model`` under ``recipe``.

    ``feeds`` (calibration batches, never evaluation data) are read only by recipes that set
    ``bias_correction`` or whose weight quantizers read data (OPTQ's Hessians when the statistics lack them,
    GPFQ's quantized inputs).
    """
    batches = None if feeds is None else list(feeds)
    quant_plan = plan_model(model, report, recipe, statistics, flagged=flagged, seq_len=seq_len, feeds=batches)
    return quantize_planned(model, quant_plan, statistics, variant=variant, feeds=batches)


def calibrate_weight_inputs(model: onnx.ModelProto | Path, quant_plan: QuantPlan, statistics: Statistics,
                            feeds: Iterable[Feed], options: CollectOptions | None = None) -> Statistics:
    """Second calibration pass: the observer kinds the plan's weight quantizers need of their GEMM inputs (OPTQ:
    ``hessian``) that ``statistics`` lack, collected over ``feeds`` (the batches ``statistics`` were collected on)
    by the model the first pass ran, and joined to them (a new Statistics; the same one when nothing is missing).
    ``options.checkpoint`` makes the pass resumable, as calibration is."""
    from builder.weights.hessians import collect_missing, missing

    return collect_missing(model, statistics, missing(quant_plan, statistics), feeds, options)


def quantize_planned(model: onnx.ModelProto, quant_plan: QuantPlan, statistics: Statistics | None = None, *,
                     variant: str = "portable", feeds: Iterable[Feed] | None = None) -> Quantized:
    """Weights and lowering of an existing plan (a plan read from plan.json, or one the search edited).

    With ``feeds``, statistics the weight quantizers lack are collected first (in memory; see
    :func:`calibrate_weight_inputs` for a resumable pass)."""
    from builder.weights.preflight import check_plan

    batches = None if feeds is None else list(feeds)
    check_plan(model, quant_plan)  # every weight config against its GEMM, before any data pass
    if batches is not None and statistics is not None:
        statistics = calibrate_weight_inputs(model, quant_plan, statistics, batches)
    weights = quantize_weights(model, quant_plan, statistics, feeds=batches)
    return Quantized(plan=quant_plan, weights=weights, model=lower(model, quant_plan, weights, variant))
