"""Weight stage: ``quantize_weights(model, plan, statistics, feeds=...) -> WeightSet``.

For every planned GEMM weight, the float weight as the GEMM will multiply it -- after every transform
that changes it (HERO FWQ folds feature scales into its rows, PEG splits it into row groups; the input
edge's quantizer names these views) -- is turned into integers and scales by the plan's weight quantizer:

* RTN reads only the weight;
* OPTQ reads the Hessian of the GEMM input from the Statistics (builder.weights.hessians collects it when a
  plan needs it), mapped to the view's inputs (builder.weights.inputs);
* GPFQ reads the quantized model's own inputs, so its GEMMs are quantized in stages by depth on the
  calibration feeds (builder.weights.staged), after every other weight is final.

Every config is first checked against its GEMM's shape (builder.weights.preflight). When the plan asks for
empirical bias correction, the GEMMs' bias shifts are then measured on the calibration feeds (builder.weights.
bias_correction) and carried in the WeightSet. Lowering only writes what the WeightSet says.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import onnx
from onnx import numpy_helper

from builder.plan.artifact import QuantPlan
from builder.quant.base import QuantizedWeight, WeightContext
from builder.quant.registry import activation_quantizer, weight_quantizer
from builder.quant.rtn import RtnConfig, RtnQuantizer
from builder.quant.weight_common import CalibWeightQuantizer
from builder.weights.hessians import missing
from builder.weights.inputs import IDENTITY, input_maps, view_statistics
from builder.weights.preflight import check_plan
from builder.weights.staged import StagedView, quantize_in_stages
from builder.weights.weightset import WeightSet, view_key
from calib.errors import BuildError, CalibrationError, ConfigError
from calib.statistics import Statistics

logger = logging.getLogger(__name__)

Feed = Mapping[str, Any]
MASK_INPUT = "attention_mask"


def _placeholder(weight: Any, axis: int, config: Any, node: str) -> QuantizedWeight:
    """RTN codes of a staged view's layout (bits, block): lowered until the stage quantizes the view."""
    rtn = RtnConfig(bits=getattr(config, "bits", 8), block=getattr(config, "block", None))
    return RtnQuantizer().quantize(weight, axis, rtn, WeightContext(node=node))


def _check_statistics(plan: QuantPlan, statistics: Statistics | None) -> None:
    lacking = missing(plan, statistics)
    if lacking:
        kinds = sorted({k for v in lacking.values() for k in v})
        raise CalibrationError(
            f"the weight quantizers of recipe {plan.recipe_name!r} need {', '.join(kinds)} statistics of "
            f"{len(lacking)} GEMM inputs the calibration statistics lack (e.g. {next(iter(lacking))!r}); collect "
            "them with builder.pipeline.calibrate_weight_inputs (`build-engine quantize` and the one-shot do so "
            "from the calibration-data flags)")


def quantize_weights(model: onnx.ModelProto, plan: QuantPlan, statistics: Statistics | None = None, *,
                     feeds: Iterable[Feed] | None = None) -> WeightSet:
    """Integer weights of every planned GEMM view (and bias shifts when the plan asks for correction).

    ``feeds`` (calibration batches, never evaluation data) are needed only when the plan has a weight quantizer
    that reads the quantized model's inputs (GPFQ) or sets ``bias_correction`` on some GEMM.
    """
    check_plan(model, plan)
    _check_statistics(plan, statistics)
    batches = None if feeds is None else list(feeds)
    initializers = {init.name: init for init in model.graph.initializer}
    edges = {a.tensor: a for a in plan.activations}
    entries: dict[str, QuantizedWeight] = {}
    staged: list[StagedView] = []
    for w in plan.weights:
        init = initializers.get(w.weight)
        if init is None:
            raise BuildError(f"GEMM {w.node!r}: weight {w.weight!r} is not an initializer of the model "
                             "(was the plan made for another model?)")
        value = numpy_helper.to_array(init)
        edge = edges.get(w.input)
        views = ({"": value} if edge is None
                 else activation_quantizer(edge.quantizer).weight_views(edge.params, value, w.axis))
        stats = statistics.tensors.get(w.input) if statistics is not None else None
        quantizer = weight_quantizer(w.quantizer)
        data_aware = isinstance(quantizer, CalibWeightQuantizer) and (quantizer.observers or quantizer.quantized_inputs)
        maps = input_maps(edge, value.shape, w.axis, w.node) if data_aware else {v: IDENTITY for v in views}
        for view, float_weight in views.items():
            key = view_key(w.node, view)
            if isinstance(quantizer, CalibWeightQuantizer) and quantizer.quantized_inputs:
                offset = float(getattr(edge.params, "offset", 0.0)) if edge is not None else 0.0  # centered input
                staged.append(StagedView(edge=w, view=view, weight=float_weight, mapping=maps[view], offset=offset))
                entries[key] = _placeholder(float_weight, w.axis, w.config, w.node)
                continue
            ctx = WeightContext(node=w.node, input_statistics=view_statistics(stats, maps[view], view))
            entries[key] = quantizer.quantize(float_weight, w.axis, w.config, ctx)
    if staged:
        if batches is None:
            raise ConfigError(f"recipe {plan.recipe_name!r} quantizes {len(staged)} weights with gpfq, which reads the "
                              "quantized model's inputs on the calibration data; pass the calibration feeds")
        mask = str(statistics.meta.options.get("mask_input", MASK_INPUT)) if statistics is not None else MASK_INPUT
        entries = quantize_in_stages(model, plan, entries, staged, batches, mask_input=mask)
    weights = WeightSet(entries=entries)
    nodes = plan.bias_correction_nodes
    if not nodes:
        return weights
    if batches is None:
        raise ConfigError(f"recipe {plan.recipe_name!r} sets bias_correction for {len(nodes)} GEMMs, which needs the "
                          "calibration data; pass the calibration feeds (or drop the setting)")
    from builder.lower.pipeline import lower
    from builder.weights.bias_correction import correct_biases

    preliminary = lower(model, plan, weights, "portable")
    _, shifts = correct_biases(model, preliminary.model, batches, nodes=nodes)
    return WeightSet(entries=entries, bias_shifts=shifts)
