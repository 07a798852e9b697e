"""Weight stage: the statistics that data-aware weight quantizers need, collected in a second calibration pass.

A weight quantizer names the observer kinds it needs of its GEMM's input (OPTQ: ``hessian``, one K x K state;
builder.quant.base.WeightQuantizer.observers). The first calibration pass collects what every activation
quantizer needs (ranges, histograms); the Hessians are collected only when a plan asks for them, for only the
GEMM inputs that need them (one state per distinct input, shared by the GEMMs that read it):

    plan -> needs(plan) -> missing(plan, statistics) -> collect(model, statistics, missing, feeds, options)
            {tensor: kinds}   what the Statistics lack     the collector over those tensors only (kinds=()),
                                                           resumable from ``options.checkpoint``, then
                                                           add_observers(statistics, extra)

:func:`add_observers` joins the second pass to the first: same model, same batches of the same data (the
order-free data digest of the Statistics), and per tensor the new kinds beside the old ones. Nothing is
re-aggregated: every state comes from its own exact pass, so the joined Statistics equal one pass that
collected every kind (and its shards still merge exactly).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import msgspec
import onnx

from builder.plan.artifact import QuantPlan
from builder.quant.registry import quantizer_of, weight_quantizer
from builder.recipes.model import Recipe
from calib.collect import CollectOptions, collect
from calib.errors import CalibrationError, ConfigError
from calib.observers import OBSERVER_KINDS
from calib.statistics import Statistics, TensorStatistics, batch_digest, combine_digests

logger = logging.getLogger(__name__)

Feed = Mapping[str, Any]


def needs(plan: QuantPlan) -> dict[str, tuple[str, ...]]:
    """GEMM input tensor -> the observer kinds its weight quantizers need (only tensors that need some)."""
    out: dict[str, list[str]] = {}
    for w in plan.weights:
        for kind in weight_quantizer(w.quantizer).observers:
            kinds = out.setdefault(w.input, [])
            if kind not in kinds:
                kinds.append(kind)
    return {tensor: tuple(kinds) for tensor, kinds in out.items()}


def missing(plan: QuantPlan, statistics: Statistics | None) -> dict[str, tuple[str, ...]]:
    """The kinds of :func:`needs` that ``statistics`` lack, per tensor."""
    out: dict[str, tuple[str, ...]] = {}
    for tensor, kinds in needs(plan).items():
        have = statistics.tensors[tensor].observers if statistics is not None and tensor in statistics else {}
        lacking = tuple(k for k in kinds if k not in have)
        if lacking:
            out[tensor] = lacking
    return out


def recipe_needs_data(recipe: Recipe) -> bool:
    """Whether quantizing with ``recipe`` may read the calibration feeds: bias correction, an activation quantizer
    whose observers calibration does not collect by default, a weight quantizer with observers of its own (a
    second pass when the Statistics lack them) or one that reads the quantized model's inputs (GPFQ)."""
    from builder.quant.registry import activation_quantizer
    from calib.statistics import DEFAULT_KINDS

    settings = (recipe.defaults, *(rule.set for rule in recipe.rules))
    if any(s.bias_correction for s in settings):
        return True
    for s in settings:  # an activation quantizer with observers calibration does not collect by default (SPARQ)
        if s.activation is not None and not set(
                activation_quantizer(quantizer_of(s.activation).name).observers) <= set(DEFAULT_KINDS):
            return True
    for s in settings:
        if s.weight is not None:
            quantizer = quantizer_of(s.weight)
            if getattr(quantizer, "observers", ()) or getattr(quantizer, "quantized_inputs", False):
                return True
    return False


def collect_missing(model: onnx.ModelProto | Any, statistics: Statistics, wanted: Mapping[str, tuple[str, ...]],
                    feeds: Iterable[Feed], options: CollectOptions | None = None) -> Statistics:
    """Statistics with the ``wanted`` kinds added, collected over ``feeds`` (the calibration batches the
    Statistics were collected on). ``model`` is what the first pass ran (a ModelProto or its file).

    ``options`` gives the checkpoint (resumed when unfinished, reused when complete; a checkpoint of other
    tensors or another model is an error, as in calibration), progress and threads; the options that change
    the states (mask input, ids input, mask handling) are the Statistics' own.
    """
    if not wanted:
        return statistics
    batches = list(feeds)
    check_same_data(statistics, batches)
    recorded = statistics.meta.options
    base = options or CollectOptions()
    opts = replace(base, kinds=(), extra_kinds=dict(wanted),
                   allow_mask_values=bool(recorded.get("allow_mask_values", base.allow_mask_values)),
                   mask_input=str(recorded.get("mask_input", base.mask_input)),
                   ids_input=str(recorded.get("ids_input", base.ids_input)),
                   bins=int(recorded.get("bins", base.bins)))
    logger.info("collecting %s of %d GEMM inputs", "/".join(sorted({k for v in wanted.values() for k in v})),
                len(wanted))
    extra = collect(model, batches, list(wanted), opts).statistics
    return add_observers(statistics, extra)


def check_same_data(statistics: Statistics, feeds: Sequence[Feed]) -> None:
    """ConfigError, before any pass, unless ``feeds`` are the batches ``statistics`` were collected on (the same
    order-free digest of every batch with its global index)."""
    meta = statistics.meta
    start = meta.batches[0].start if meta.batches else 0
    digest = ""
    for index, feed in enumerate(feeds):
        digest = combine_digests(digest, batch_digest(start + index, feed))
    if len(feeds) != meta.num_batches or digest != meta.data_digest:
        raise ConfigError(f"the calibration feeds ({len(feeds)} batches) are not the data the statistics were "
                          f"collected on ({meta.data_source or 'unknown'}, {meta.num_batches} batches); give the "
                          "calibration-data flags the statistics were collected with (--calib-data, --samples, "
                          "--seed, --batch-size, --max-length)")


def add_observers(statistics: Statistics, extra: Statistics) -> Statistics:
    """A new Statistics: ``statistics`` with the observers of ``extra`` (a second pass over the same batches)
    added per tensor. Neither input is changed."""
    a, b = statistics.meta, extra.meta
    if a.model_sha256 != b.model_sha256:
        raise CalibrationError("the second calibration pass ran another model than the statistics were collected on "
                               f"(model SHA-256 {b.model_sha256[:12]} vs {a.model_sha256[:12]})")
    if a.data_digest != b.data_digest or a.batches != b.batches:
        raise ConfigError(f"the second calibration pass read other data than the statistics (statistics: "
                          f"{a.data_source or 'unknown'}, {a.num_batches} batches; this pass: "
                          f"{b.data_source or 'unknown'}, {b.num_batches} batches); give the calibration-data flags "
                          "the statistics were collected with (--calib-data, --samples, --seed, --batch-size, "
                          "--max-length)")
    tensors = dict(statistics.tensors)
    kinds = dict(a.kinds)
    layouts = dict(a.layouts)
    for name, new in extra.tensors.items():
        old = tensors.get(name)
        merged = dict(old.observers) if old is not None else {}
        clash = sorted(set(merged) & set(new.observers))
        if clash:
            raise CalibrationError(f"tensor {name!r} already has {', '.join(clash)} statistics")
        merged.update(new.observers)
        ordered = {k: merged[k] for k in OBSERVER_KINDS if k in merged} | {k: v for k, v in merged.items()
                                                                           if k not in OBSERVER_KINDS}
        tensors[name] = TensorStatistics(tensor=name, observers=ordered,
                                         mask_values=old.mask_values if old is not None else new.mask_values,
                                         allow_mask_values=(old or new).allow_mask_values)
        kinds[name] = tuple(ordered)
        if name not in layouts and name in b.layouts:
            layouts[name] = b.layouts[name]
    names = a.tensors + tuple(n for n in extra.tensors if n not in statistics.tensors)
    meta = msgspec.structs.replace(a, tensors=names, kinds=kinds, layouts=layouts)
    return Statistics(meta=meta, tensors=tensors)
