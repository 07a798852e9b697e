"""CLI stage: ``build-engine quantize`` -- recipe + ranges -> Q/DQ ONNX, plan.json and the resolved recipe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = """\
Quantize an ONNX model with a recipe and calibrated ranges: write the lowered Q/DQ graph.

A recipe is a preset (fp16, int8-gemm, hero-m1, hero-m2, hero-m3, bondarenko-mp, bondarenko-peg) or a YAML
file. Rules select nodes by role, layer and name glob; for every setting the last matching rule wins.
--fallback adds rules after the recipe's own: layer.<i>, layer.<i>.<role>, role:<role> or name:<glob>,
set to fp16, bf16 or fp32. Writes model.onnx, plan.json (every quantized edge and the reason for every
node left in higher precision), recipe.yaml (the resolved recipe) and precision.json (per-node precision
for weakly typed TensorRT 10 builds) into the output folder.

Recipes that set bias_correction also read the calibration texts (--calib-data, --samples, --seed: use the
ones the ranges were calibrated on) and shift each INT8 GEMM's bias by its mean output error on them.
"""

EPILOG = """\
examples:
  build-engine quantize model.onnx --ranges engines/m/ranges.json --recipe int8-gemm -o engines/m
  build-engine quantize model.onnx --ranges r.json --recipe bondarenko-mp --outliers outliers.json -o out
  build-engine quantize model.onnx --ranges r.json --recipe int8-gemm --fallback layer.5.fc2=fp16 -o out
  build-engine quantize model.onnx --recipe hero-m2 --fallback role:softmax=bf16 --print-config

exit codes: 0 ok, 2 bad recipe, override or flag, 3 unreadable model or missing ranges, 4 lowering failed
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="ONNX model file (FP32, as exported)")
    parser.add_argument("--ranges", type=Path, action="append", default=[], metavar="PATH",
                        help="RangeTable JSON (repeat to offer several range methods)")
    parser.add_argument("--recipe", default="int8-gemm", help="preset name or recipe YAML path (default int8-gemm)")
    parser.add_argument("--fallback", action="append", default=[], metavar="TARGET=DTYPE",
                        help="keep a layer, role or node in fp16/bf16/fp32 (repeatable)")
    parser.add_argument("--outliers", type=Path, metavar="PATH",
                        help="outlier report JSON (calibrate --report) or {'flagged_layers': [...]}, for bondarenko-mp")
    parser.add_argument("--flagged-layers", metavar="I,J", help="flagged layer indices, instead of --outliers")
    parser.add_argument("--variant", choices=("portable", "plugin"), default="portable",
                        help="portable: standard ops + Q/DQ; plugin: fused LN+quant and softmax+quant nodes")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length for the INT8 GEMM-FLOP share")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default engines/<model name>)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe and per-node decisions, write nothing")
    from builder.cli.run import add_calib_data_arguments

    add_calib_data_arguments(parser.add_argument_group("calibration data (read only by recipes that set "
                                                       "bias_correction)"))

def _flagged(args: argparse.Namespace) -> tuple[int, ...] | None:
    from calib.errors import ConfigError

    if args.flagged_layers is not None:
        try:
            return tuple(int(v) for v in args.flagged_layers.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--flagged-layers {args.flagged_layers!r}: expected integers like 4,5") from None
    if args.outliers is None:
        return None
    if not args.outliers.is_file():
        raise ConfigError(f"--outliers file {str(args.outliers)!r} does not exist")
    from types import SimpleNamespace

    from builder.plan.planner import flagged_layers

    data: Any = json.loads(args.outliers.read_text(encoding="utf-8"))
    if isinstance(data, dict) and isinstance(data.get("rows"), list):  # the outlier report of `calibrate --report`
        rows = [SimpleNamespace(layer=r.get("layer"), role=r.get("role"), max_over_p9999=r.get("max_over_p9999", 0))
                for r in data["rows"]]
        return flagged_layers(SimpleNamespace(rows=rows))
    if not isinstance(data, dict) or "flagged_layers" not in data:
        raise ConfigError(f"--outliers {args.outliers}: expected the outlier report JSON (with 'rows') or an "
                          "object with a 'flagged_layers' list")
    return tuple(int(v) for v in data["flagged_layers"])


def _print_config(recipe: Any, report: Any, flagged: tuple[int, ...] | None) -> None:
    from builder.recipes.loader import recipe_to_yaml
    from builder.recipes.resolve import resolve

    print(recipe_to_yaml(recipe), end="")
    print("\n# per-node decisions (node, role, layer, precision, decided by)")
    for name, node in resolve(recipe, report, flagged).items():
        a = node.assignment
        precision = node.settings.precision.value if node.settings.precision else "fp32"
        print(f"# {a.role.value:14s} layer {a.layer!s:4s} {precision:5s} {name}  <- {node.precision_note}")


def run(args: argparse.Namespace) -> int:
    from builder.cli.steps import calibration_feeds
    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.lower.quantize import lower_with_correction, resolve_recipe
    from builder.plan.flops import gemm_flops
    from builder.plan.planner import plan
    from builder.recipes.loader import recipe_to_yaml
    from calib.artifact_io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from calib.errors import ConfigError
    from calib.range_table import RangeTable

    model = load_model(args.model)
    report = analyze(model, name=args.model.stem)
    recipe = resolve_recipe(args.recipe, report, args.fallback)
    flagged = _flagged(args)
    if args.print_config:
        _print_config(recipe, report, flagged)
        return 0
    if not args.ranges:
        raise ConfigError("quantize needs --ranges (a RangeTable JSON from `build-engine calibrate`)")
    tables = []
    for path in args.ranges:
        if not path.is_file():
            raise ConfigError(f"--ranges file {str(path)!r} does not exist")
        tables.append(RangeTable.from_json(path.read_text(encoding="utf-8")))
    quant_plan = plan(report, recipe, tables, outliers=flagged, flops=gemm_flops(model, report, args.seq_len),
                      seq_len=args.seq_len)
    feeds = None
    if quant_plan.bias_correction_nodes:
        from builder.cli.run import calib_settings

        feeds = calibration_feeds(calib_settings(args))
    lowered = lower_with_correction(model, quant_plan, args.variant, feeds)
    out: Path = args.output or Path("engines") / args.model.stem
    atomic_write_bytes(out / "model.onnx", lowered.serialize())
    atomic_write_text(out / "plan.json", quant_plan.to_json())
    atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
    atomic_write_json(out / "precision.json", lowered.precision)
    kept = sum(1 for n in quant_plan.nodes if n.precision.value != "int8")
    print(f"{recipe.name}: {len(quant_plan.activations)} quantized activations, {len(quant_plan.weights)} INT8 "
          f"weights, {kept} nodes in higher precision, INT8 GEMM-FLOP share "
          f"{quant_plan.int8_gemm_flop_share:.1%}")
    print(f"wrote {out / 'model.onnx'}, plan.json, recipe.yaml, precision.json")
    return 0
