"""CLI stage: ``build-engine quantize`` -- recipe + calibration statistics -> Q/DQ ONNX, plan.json, recipe."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

HELP = """\
Quantize an ONNX model with a recipe and its calibration statistics: write the lowered Q/DQ graph.

A recipe is a preset (fp16, int8-gemm, hero-m1, hero-m2, hero-m3, bondarenko-mp, bondarenko-peg) or a YAML
file. Rules select nodes by role, layer and name glob; for every setting the last matching rule wins; each
rule names registered quantizers with typed options (activation: static, centered, fwq, peg, none; weight:
rtn, optq, gpfq).
--fallback adds rules after the recipe's own: layer.<i>, layer.<i>.<role>, role:<role> or name:<glob>, set
to fp16, bf16 or fp32. The ranges of every recipe are decided from the one statistics.npz that `calibrate`
wrote (--statistics: that file or its folder); no second calibration. --plan lowers a plan.json instead
(for instance one edited by hand or by the precision search). Writes model.onnx, plan.json (every
quantized edge and the reason for every node left in higher precision), recipe.yaml (the resolved recipe)
and precision.json (per-node precision for weakly typed TensorRT 10 builds) into the output folder.

Recipes that set bias_correction also read the calibration texts (--calib-data, --samples, --seed: use the
ones the statistics were collected on) and shift each INT8 GEMM's bias by its mean output error on them.

--weights rtn|optq|gpfq (with --weight-bits, --weight-block, --accumulator-bits, --tile ...) adds a last rule
that gives every INT8 weight GEMM that weight quantizer, on top of any preset. optq needs the Hessians of the
GEMM inputs: when the statistics lack them, quantize collects them in one more pass over the calibration texts
(the same flags as `calibrate`; checkpointed in OUTPUT/hessians.npz, resumed after an interruption, reused by
a re-run); gpfq reads the quantized model's own inputs on those texts, layer by layer.
"""

EPILOG = """\
examples:
  build-engine calibrate model.onnx -o engines/m
  build-engine quantize model.onnx --statistics engines/m --recipe int8-gemm -o engines/m-int8
  build-engine quantize model.onnx --statistics engines/m --recipe bondarenko-mp -o engines/m-mp
  build-engine quantize model.onnx --statistics engines/m --recipe int8-gemm --fallback layer.5.fc2=fp16 -o out
  build-engine quantize model.onnx --statistics engines/m --plan engines/m-int8/plan.json -o out
  build-engine quantize model.onnx --recipe hero-m2 --fallback role:softmax=bf16 --print-config
  build-engine quantize model.onnx --statistics engines/m --recipe int8-gemm --weights optq -o engines/m-optq
  build-engine quantize model.onnx --statistics engines/m --recipe int8-gemm --weights optq --weight-bits 4 \\
      --weight-block 128 --weight-only -o engines/m-w4a16
  build-engine quantize model.onnx --statistics engines/m --recipe int8-gemm --weights gpfq --weight-bits 4 \\
      --accumulator-bits 16 --tile 128 -o engines/m-w4a8-axe

exit codes: 0 ok, 2 bad recipe, plan, override or flag, 3 unreadable model or statistics, 4 lowering failed
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from builder.cli.common import add_calib_data_arguments, add_weight_arguments

    parser.add_argument("model", type=Path, help="ONNX model file (FP32, as exported)")
    parser.add_argument("--statistics", "--ranges", dest="statistics", type=Path, metavar="PATH",
                        help="statistics.npz from `build-engine calibrate`, or its folder (ranges.json there is "
                             "accepted too: its statistics lie beside it)")
    parser.add_argument("--recipe", default="int8-gemm", help="preset name or recipe YAML path (default int8-gemm)")
    parser.add_argument("--plan", type=Path, metavar="PATH", help="lower this plan.json instead of planning")
    parser.add_argument("--fallback", action="append", default=[], metavar="TARGET=DTYPE",
                        help="keep a layer, role or node in fp16/bf16/fp32 (repeatable)")
    parser.add_argument("--flagged-layers", metavar="I,J",
                        help="layers the Bondarenko MP rule treats as outlier layers (default: from the statistics' "
                             "outlier report)")
    parser.add_argument("--variant", choices=("portable", "plugin"), default="portable",
                        help="portable: standard ops + Q/DQ; plugin: fused LN+quant and softmax+quant nodes")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length for the INT8 GEMM-FLOP share")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default engines/<model name>)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe and per-node decisions, write nothing")
    add_calib_data_arguments(parser.add_argument_group("calibration data (read only by recipes that set "
                                                       "bias_correction, optq or gpfq: the texts the statistics "
                                                       "were collected on)"))
    add_weight_arguments(parser.add_argument_group("weight quantization (a last rule for every INT8 weight GEMM)"))


def _flagged(args: argparse.Namespace) -> tuple[int, ...] | None:
    from calib.errors import ConfigError

    if args.flagged_layers is None:
        return None
    try:
        return tuple(int(v) for v in args.flagged_layers.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--flagged-layers {args.flagged_layers!r}: expected integers like 4,5") from None


def print_config(recipe: Any, report: Any, flagged: tuple[int, ...] | None) -> None:
    """The resolved recipe as YAML, then the decision for every node."""
    from builder.recipes.loader import recipe_to_yaml
    from builder.recipes.resolve import resolve

    print(recipe_to_yaml(recipe), end="")
    print("\n# per-node decisions (node, role, layer, precision, decided by)")
    for name, node in resolve(recipe, report, flagged or ()).items():
        a = node.assignment
        precision = node.settings.precision.value if node.settings.precision else "fp32"
        print(f"# {a.role.value:14s} layer {a.layer!s:4s} {precision:5s} {name}  <- {node.precision_note}")


def run(args: argparse.Namespace) -> int:
    from builder.cli.lock import claim_output_dir

    if args.print_config:  # writes nothing
        return _quantize(args, None)
    output: Path = args.output or Path("engines") / args.model.stem
    with claim_output_dir(output, "quantize", parents=args.output is None):  # checked and locked before any work
        return _quantize(args, output)


def _quantize(args: argparse.Namespace, out: Path | None) -> int:
    from builder.cli.common import calib_settings, weight_flags
    from builder.cli.steps import calibration_feeds, load_statistics, quantize_summary, write_quantized
    from builder.intake.prepare import prepare_model
    from builder.pipeline import analyze_model, resolve_recipe
    from builder.plan.artifact import load_plan
    from builder.recipes.loader import recipe_to_yaml
    from builder.weights.preflight import check_recipe
    from calib.errors import ConfigError

    flags = weight_flags(args)  # bits, accumulator and the like fail before the model is read
    prepared = prepare_model(args.model)
    if prepared.rewritten:
        print(prepared.describe())
    model = prepared.model
    report = analyze_model(model, args.model.stem)
    recipe = resolve_recipe(args.recipe, report, args.fallback)
    if flags is not None:
        recipe = flags.apply(recipe, report)
    flagged = _flagged(args)
    if args.print_config or out is None:
        print_config(recipe, report, flagged)
        return 0
    quant_plan = None
    if args.plan is not None:
        if not args.plan.is_file():
            raise ConfigError(f"--plan file {str(args.plan)!r} does not exist")
        if args.weights is not None:
            raise ConfigError("--weights changes the recipe; a --plan already names every weight quantizer")
        quant_plan = load_plan(args.plan.read_text(encoding="utf-8"), where=str(args.plan))
    else:
        check_recipe(model, report, recipe)  # weight configs against the GEMM shapes, before reading statistics
    if args.statistics is None:
        raise ConfigError("quantize needs --statistics (the statistics.npz `build-engine calibrate` wrote, or its "
                          "folder)")
    statistics = load_statistics(args.statistics)
    settings = calib_settings(args)
    # the calibration texts, read at most once and only when the recipe needs them
    feeds = functools.cache(lambda: calibration_feeds(settings, settings.encoder(args.model)))
    if quant_plan is None:
        quant_plan, statistics = _plan(args, prepared, report, recipe, statistics, flagged, feeds)
    result = _weights_and_lowering(args, prepared, quant_plan, statistics, out, feeds, settings.source)
    write_quantized(out, result, recipe_to_yaml(recipe) if args.plan is None else None)
    print(quantize_summary(result, args.variant))
    print(f"wrote {out / 'model.onnx'}, plan.json, {'recipe.yaml, ' if args.plan is None else ''}precision.json")
    return 0


def _plan(args: argparse.Namespace, prepared: Any, report: Any, recipe: Any, statistics: Any,
          flagged: tuple[int, ...] | None, feeds: Callable[[], Any]) -> tuple[Any, Any]:
    """The plan and its Statistics; observers the recipe needs that calibration does not collect by default
    (vSPARQ's zero pairs) are collected here from the calibration texts (the calibration-data flags as for
    ``calibrate``)."""
    from builder.pipeline import plan_and_statistics

    def announced() -> Any:
        print("collecting the observers the recipe needs beyond the calibration's from the calibration data")
        return feeds()

    return plan_and_statistics(prepared.model, report, recipe, statistics, flagged=flagged, seq_len=args.seq_len,
                               feeds=announced, source=prepared.model if prepared.rewritten else prepared.path)


def _weights_and_lowering(args: argparse.Namespace, prepared: Any, quant_plan: Any, statistics: Any,
                          out: Path, feeds: Callable[[], Any], data_source: str) -> Any:
    """Weights and lowering of the plan; the calibration texts are read when the plan needs them (bias
    correction, OPTQ's Hessians when the statistics lack them: collected into ``out/hessians.npz``, GPFQ)."""
    from builder.cli.steps import weight_statistics
    from builder.pipeline import quantize_planned
    from builder.quant.registry import weight_quantizer
    from builder.weights.hessians import missing
    from builder.weights.preflight import check_plan

    check_plan(prepared.model, quant_plan)  # before any pass over the data
    staged = any(getattr(weight_quantizer(w.quantizer), "quantized_inputs", False) for w in quant_plan.weights)
    lacking = missing(quant_plan, statistics)
    batches = feeds() if quant_plan.bias_correction_nodes or staged or lacking else None
    if lacking:
        source = prepared.model if prepared.rewritten else prepared.path
        statistics = weight_statistics(source, quant_plan, statistics, feeds(), out, data_source=data_source)
    return quantize_planned(prepared.model, quant_plan, statistics, variant=args.variant, feeds=batches)
