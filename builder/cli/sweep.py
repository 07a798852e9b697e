"""CLI stage: ``build-engine sweep`` -- the build matrix (recipes x backends x architectures x profiles)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = """\
Build every engine a deployment needs from one calibration: recipes x backends x architectures x profiles.

Calibrates once (sharded over Ray with --ray), quantizes each recipe from the same statistics, builds one
engine per (recipe, backend, architecture, profile) and evaluates each recipe against FP32; writes one table
(sweep.json, sweep.md) and a Pareto plot (pareto.png: engine size, or latency where measured, against the
cosine to FP32). With --ray every step is a Ray task routed by resources: TensorRT-RTX builds run on any
CPU; full-TensorRT builds need a node with a GPU of that architecture, declared as the custom resource
tensorrt-<arch> (e.g. `ray start --num-gpus 1 --resources '{"tensorrt-sm89": 1}'`). Without --ray the same
tasks run in this process. A re-run reuses calibration shards and engines whose inputs are unchanged.
"""

EPILOG = """\
examples:
  build-engine sweep model.onnx --recipes int8-gemm,hero-m2,hero-m3 --arch sm86,sm89 -o engines/sweep
  build-engine sweep model.onnx --recipes int8-gemm,hero-m2 --arch sm86,sm89 --batch 1,8,32 --batch 1,1,1 \\
      --ray auto --shards 8 -o engines/sweep
  build-engine sweep model.onnx --recipes hero-m3 --backends tensorrt --arch sm89,sm90 --ray 10.0.0.5:6379

exit codes: 0 ok, 2 bad flag or no node offers a needed resource, 3 graph or calibration, 4 build,
5 missing optional backend or Ray
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from builder.cli.common import add_calib_data_arguments

    parser.add_argument("model", type=Path, help="ONNX model file (FP32)")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default: engines/<model>-sweep)")
    matrix = parser.add_argument_group("matrix")
    matrix.add_argument("--recipes", default="int8-gemm", help="comma-separated presets or recipe YAML files")
    matrix.add_argument("--backends", default="tensorrt-rtx", help="comma-separated: tensorrt-rtx, tensorrt")
    matrix.add_argument("--arch", default="sm86", help="comma-separated architectures, e.g. sm86,sm89 (one engine "
                        "each)")
    matrix.add_argument("--batch", action="append", help="batch min,opt,max of a profile (repeatable; default "
                        "1,8,32)")
    matrix.add_argument("--seq", action="append", help="sequence min,opt,max of a profile (repeatable; default "
                        "1,128,128, capped at the model's position table); profiles are every --batch with every --seq")
    matrix.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (default: 3)")
    matrix.add_argument("--variant", choices=("portable", "plugin"), default="portable", help="Q/DQ graph variant")
    add_calib_data_arguments(parser.add_argument_group("calibration data"))
    scale = parser.add_argument_group("scale-out (the [ray] extra)")
    scale.add_argument("--ray", metavar="ADDRESS", help="run every task on Ray: auto, local or HOST:PORT")
    scale.add_argument("--shards", type=int, help="calibration shards (default: one per CPU of the Ray cluster)")
    steps = parser.add_argument_group("steps")
    steps.add_argument("--no-evaluate", action="store_true", help="skip the accuracy evaluation (no Pareto plot)")
    steps.add_argument("--eval-test", type=int, help="test sentences for the evaluation (default: the whole split)")
    steps.add_argument("--eval-train", type=int, help="probe train sentences (default: the whole split)")
    steps.add_argument("--fresh", action="store_true", help="calibrate afresh (drops statistics and shards)")
    steps.add_argument("--no-progress", action="store_true", help="no progress output")


def _split(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def run(args: argparse.Namespace) -> int:
    import itertools

    from builder.backends.options import BackendName, BuildOptions, DimRange, ShapeProfile
    from builder.cli.common import calib_settings
    from builder.cli.lock import claim_output_dir
    from builder.distributed.sweep import SweepRequest, run_sweep
    from builder.distributed.sweep_report import format_table
    from calib.errors import ConfigError

    if not args.model.is_file():
        raise ConfigError(f"model file {str(args.model)!r} does not exist")
    from builder.cli.build import default_seq

    seqs = args.seq or [default_seq(args.model, 0)]
    profiles = tuple(ShapeProfile(batch=DimRange.parse(b, "--batch"), seq=DimRange.parse(s, "--seq"))
                     for b, s in itertools.product(args.batch or ["1,8,32"], seqs))
    folder: Path = args.output or Path("engines") / f"{args.model.stem}-sweep"
    request = SweepRequest(
        model_path=args.model, folder=folder, recipes=_split(args.recipes),
        backends=tuple(BackendName.parse(b) for b in _split(args.backends)), architectures=_split(args.arch),
        profiles=profiles, options=BuildOptions(optimization_level=args.opt_level), calibration=calib_settings(args),
        variant=args.variant, address=args.ray, shards=args.shards, evaluate=not args.no_evaluate,
        eval_train=args.eval_train, eval_test=args.eval_test, fresh=args.fresh, progress=not args.no_progress)
    with claim_output_dir(folder, "sweep", parents=args.output is None):
        report = run_sweep(request)
    print()
    print(format_table(report), end="")
    written = ["sweep.json", "sweep.md"] + (["pareto.png"] if (folder / "pareto.png").is_file() else [])
    print(f"\nwrote {', '.join(str(folder / w) for w in written)}")
    return 0
