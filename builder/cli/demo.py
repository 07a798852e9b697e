"""CLI stage: ``build-engine demo`` -- the whole pipeline on the bundled all-MiniLM-L6-v2.

Export (cached) -> analyze -> calibrate once on 512 VADER sentences -> for each recipe: quantize, build with
the best available backend, evaluate against FP32 -> one summary table. Each step is a small function.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.cli.oneshot import PipelineResult
    from builder.evaluate.evaluate import EvalData, Reference
    from builder.graph.report import GraphReport

HELP = """\
Run the whole pipeline on the bundled all-MiniLM-L6-v2 sentence encoder.

Exports the model to ONNX once (cached), prints its analysis, calibrates it once on 512 human-rated VADER
movie sentences, then for each recipe quantizes it, builds an engine with the best available backend
(TensorRT-RTX ahead of time on a CPU machine) and evaluates it against FP32 on held-out sentences. Ends with
one table: probe accuracy, cosine to FP32, Spearman on the Lee rated pairs, INT8 GEMM share, engine.
Artifacts go to engines/minilm-<recipe>/; a second run reuses every unchanged step.
"""

EPILOG = """\
examples:
  build-engine demo
  build-engine demo --recipes int8-gemm,hero-m3 --eval-test 4000
  build-engine demo --no-build --json minilm-report.json
"""

DEFAULT_RECIPES = "fp16,int8-gemm,hero-m2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated (default: {DEFAULT_RECIPES})")
    parser.add_argument("--engines", type=Path, default=Path("engines"), help="output root (default: engines)")
    parser.add_argument("--backend", default="auto", help="auto | tensorrt | tensorrt-rtx (default: auto)")
    parser.add_argument("--arch", default="sm86,sm89", help="TensorRT-RTX targets (default: sm86,sm89)")
    parser.add_argument("--eval-test", type=int, default=2000, help="test sentences (default: 2000)")
    parser.add_argument("--eval-train", type=int, default=2000, help="probe train sentences (default: 2000)")
    parser.add_argument("--no-build", action="store_true", help="skip engine builds")
    parser.add_argument("--cache-dir", type=Path, help="folder for the cached ONNX export (default: ~/.cache)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the GraphReport as JSON to PATH")
    parser.add_argument("--fresh", action="store_true", help="ignore the statistics.npz of an earlier calibration")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def export_step(cache_dir: Path | None) -> Path:
    """Export (or reuse) the MiniLM ONNX file."""
    from builder.intake.minilm import ensure_minilm_onnx

    path = ensure_minilm_onnx(cache_dir)
    print(f"model: {path}")
    return path


def analyze_step(path: Path, json_path: Path | None) -> GraphReport:
    """Load, check and analyze the export; print the role table."""
    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.graph.render import format_report
    from builder.intake.minilm import MODEL_NAME
    from calib.artifact_io import atomic_write_text

    report = analyze(load_model(path), name=MODEL_NAME)
    print(format_report(report), end="")
    if json_path is not None:
        atomic_write_text(json_path, report.to_json())
        print(f"wrote {json_path}")
    return report


def summary_table(results: list[PipelineResult], data: EvalData, reference: Reference, fp32_path: Path) -> str:
    """The closing table: the FP32 row, then one row per recipe."""
    import onnx

    from builder.evaluate.evaluate import reference_report
    from builder.evaluate.render import SUMMARY_HEADER, format_table, summary_row

    rows = [(*summary_row(reference_report(onnx.load(str(fp32_path)), data, reference)), "- (ONNX Runtime FP32)")]
    for result in results:
        if result.accuracy is not None:
            rows.append((*summary_row(result.accuracy), result.engine or "-"))
    return format_table(rows, (*SUMMARY_HEADER, "engine"))


def run(args: argparse.Namespace) -> int:
    from contextlib import ExitStack

    from builder.cli.lock import claim_output_dir
    from builder.engine.outputs import check_output_dir, check_output_file

    recipes = list(dict.fromkeys(r.strip() for r in args.recipes.split(",") if r.strip()))
    if args.json is not None:  # one file written atomically: checked, not locked
        check_output_file(args.json)
    check_output_dir(args.engines)
    with ExitStack() as folders:  # every recipe folder checked and locked before any work
        for recipe in recipes:
            folders.enter_context(claim_output_dir(args.engines / f"minilm-{recipe}", "demo", parents=True))
        _check_export_cache(args.cache_dir)
        return _demo(args, recipes)


def _check_export_cache(cache_dir: Path | None) -> None:
    """The MiniLM export is written into its cache folder once: that folder must be writable then."""
    from builder.engine.outputs import check_output_dir
    from builder.intake.minilm import minilm_model_dir, minilm_onnx_cache_path

    minilm_model_dir()  # BackendUnavailable naming the package when it is not installed
    export = minilm_onnx_cache_path(cache_dir)
    if not export.is_file():
        check_output_dir(export.parent, parents=True)


def _demo(args: argparse.Namespace, recipes: list[str]) -> int:
    from builder.backends.options import BackendName, BuildOptions
    from builder.cli.oneshot import PipelineRequest, evaluation_data, run_pipeline
    from builder.cli.steps import CalibSettings
    from calib.range_table import RangeMethod
    from calib.ranges import RangeSpec

    path = export_step(args.cache_dir)
    analyze_step(path, args.json)
    options = None if args.no_build else BuildOptions(
        backend=BackendName.parse(args.backend), optimization_level=3,
        architectures=tuple(a for a in args.arch.split(",") if a))
    print(f"\npreparing the FP32 reference on {args.eval_test} test / {args.eval_train} train sentences", flush=True)
    encoder = CalibSettings().encoder(path)

    @functools.cache
    def evaluation() -> tuple[EvalData, Reference]:  # computed once, by the first recipe, and shared
        return evaluation_data(args.eval_train, args.eval_test, 0, path, encoder,
                               cache_dir=args.engines / "minilm-eval-cache", progress=not args.no_progress)

    statistics = None
    results = []
    for recipe in recipes:
        print(f"\n== {recipe}", flush=True)
        request = PipelineRequest(model_path=path, folder=args.engines / f"minilm-{recipe}", recipe=recipe,
                                  calibration=CalibSettings(), ranges_view=RangeSpec(method=RangeMethod.MAX),
                                  build=options, fresh=args.fresh, progress=not args.no_progress)
        result, statistics = run_pipeline(request, statistics=statistics, evaluation=evaluation)
        results.append(result)
    print("\nsummary (ONNX Runtime CPU accuracy of each lowered graph; engines built, not run, on this machine)")
    print(summary_table(results, *evaluation(), path))
    return 0
