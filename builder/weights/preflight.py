"""Weight stage: every weight quantizer's config checked against the GEMMs it will quantize, before any work.

Options that depend on no shape (bits outside 2..8, an accumulator too narrow for even one product, a block
with more than 4 bits) fail when the config is built. What depends on the GEMM fails here, naming the GEMM:
a ``block`` that does not divide K, an accumulator ``tile`` larger than K; and what depends on the plan: GPFQ
on a GEMM its input quantizer splits (PEG), AXE on a GEMM whose input is not quantized to integers, a weight
view OPTQ/GPFQ cannot map their input statistics to. :func:`check_plan` runs right after planning (before the
Hessians are collected); :func:`check_recipe` runs on the recipe before calibration (without the views,
which need the Statistics).
"""

from __future__ import annotations

from collections.abc import Collection

import onnx
from onnx import numpy_helper

from builder.graph.report import GraphReport
from builder.plan.artifact import QuantPlan
from builder.quant.registry import activation_quantizer, quantizer_of, weight_quantizer
from builder.quant.weight_common import AxeOptions, CalibWeightQuantizer
from builder.recipes.model import WEIGHT_GEMM_ROLES, Precision, Recipe
from builder.recipes.resolve import resolve
from builder.weights.inputs import input_maps
from calib.errors import BuildError, ConfigError


def _shapes(model: onnx.ModelProto, names: Collection[str]) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(int(d) for d in i.dims) for i in model.graph.initializer if i.name in names}


def check_plan(model: onnx.ModelProto, plan: QuantPlan) -> None:
    """ConfigError naming the first GEMM whose weight quantizer cannot take it (see the module docstring)."""
    edges = {a.tensor: a for a in plan.activations}
    inits = {i.name: i for i in model.graph.initializer}
    for w in plan.weights:
        quantizer = weight_quantizer(w.quantizer)
        if not isinstance(quantizer, CalibWeightQuantizer):
            continue
        init = inits.get(w.weight)
        if init is None:
            raise BuildError(f"GEMM {w.node!r}: weight {w.weight!r} is not an initializer of the model")
        edge = edges.get(w.input)
        config = w.config
        if isinstance(config, AxeOptions) and config.accumulator_bits is not None and (
                edge is None or edge.quantizer == "none"):
            raise ConfigError(f"GEMM {w.node!r}: {w.quantizer} with accumulator_bits bounds integer activations, but "
                              "its input is not quantized (activation quantizer none); drop accumulator_bits for "
                              "weight-only GEMMs")
        reduction = 1 - w.axis % 2
        if edge is None:
            views = {"": int(init.dims[reduction])}
        else:
            transform = activation_quantizer(edge.quantizer).weight_views
            views = {name: int(v.shape[reduction])
                     for name, v in transform(edge.params, numpy_helper.to_array(init), w.axis).items()}
            if quantizer.observers or quantizer.quantized_inputs:
                input_maps(edge, tuple(init.dims), w.axis, w.node)  # a view these cannot map is refused here
        if quantizer.quantized_inputs and len(views) > 1:
            assert edge is not None
            raise ConfigError(f"GEMM {w.node!r}: gpfq needs the GEMM's own quantized input, but activation quantizer "
                              f"{edge.quantizer!r} splits it into {len(views)} GEMMs; use optq or rtn there")
        for k in views.values():
            quantizer.check_shape(config, k, w.node)


def check_recipe(model: onnx.ModelProto, report: GraphReport, recipe: Recipe) -> None:
    """The weight configs of ``recipe`` against the K of every weight GEMM they would quantize (before
    calibration; layers the outlier report may flag count as INT8)."""
    flagged = () if any(r.select.flagged for r in recipe.rules) else None
    resolved = resolve(recipe, report, flagged)
    weights = {a.weight for a in report.assignments if a.weight is not None}
    shapes = _shapes(model, weights)
    for name, node in resolved.items():
        a, s = node.assignment, node.settings
        if s.precision != Precision.INT8 or a.role not in WEIGHT_GEMM_ROLES or s.weight is None:
            continue
        quantizer = quantizer_of(s.weight)
        shape = shapes.get(a.weight or "")
        if isinstance(quantizer, CalibWeightQuantizer) and shape is not None and a.weight_axis is not None \
                and len(shape) == 2:
            quantizer.check_shape(s.weight, shape[1 - a.weight_axis % 2], name)
