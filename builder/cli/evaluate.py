"""CLI stage: ``build-engine evaluate`` -- accuracy of a (quantized) model against its FP32 reference."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = """\
Measure how close a quantized model stays to its FP32 reference, on ONNX Runtime (CPU).

Reports the cosine of pooled sentence embeddings to FP32 (mean and min) on the VADER movie-sentence test
split, the accuracy of a logistic-regression probe on those embeddings (sign of the human rating; fitted on
FP32 embeddings of the train split, and refitted on the model's own), Spearman correlation on the Lee rated
document pairs from gensim, the share of GEMM FLOPs that runs in INT8, and a per-layer table of the residual
stream's relative error that locates the damage. Calibration sentences are never used here.
Models with plugin nodes run through the plugins' NumPy references (needs the [plugins] extra).
"""

EPILOG = """\
examples:
  build-engine evaluate engines/minilm-int8/model.onnx --reference minilm.onnx
  build-engine evaluate q.onnx --reference fp32.onnx --test-samples 2000 --no-refit -o report.json
  build-engine evaluate q.onnx --reference fp32.onnx --graph-report analysis.json

exit codes: 0 ok, 2 missing file or bad flag, 3 unreadable model or unusable data, 5 missing optional package
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the ONNX model to evaluate (Q/DQ, fallback or plugin variant)")
    parser.add_argument("--reference", type=Path, required=True, metavar="FP32.onnx", help="the FP32 model")
    parser.add_argument(
        "--graph-report", type=Path, metavar="JSON", help="GraphReport of the FP32 model (default: analyze it)"
    )
    parser.add_argument("-o", "--output", type=Path, metavar="JSON", help="write the AccuracyReport here")
    parser.add_argument("--name", help="model name in the report (default: the parent folder or file name)")
    parser.add_argument("--test-samples", type=int, metavar="N", help="use the first N test sentences (default all)")
    parser.add_argument("--train-samples", type=int, metavar="N", help="use the first N probe train sentences")
    parser.add_argument(
        "--layer-sentences", type=int, default=256, metavar="N", help="sentences for the per-layer table (256)"
    )
    parser.add_argument("--no-refit", action="store_true", help="skip the probe refitted on the model's embeddings")
    parser.add_argument("--seed", type=int, default=0, help="seed of the VADER split (must match calibration's)")


def _check_counts(args: argparse.Namespace) -> None:
    from calib.errors import ConfigError

    for flag in ("test_samples", "train_samples", "layer_sentences"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive count, got {value}")
    if args.train_samples is not None and args.train_samples < 20:
        raise ConfigError(f"--train-samples {args.train_samples} is too few to fit the probe; use at least 20")


def _model_name(path: Path) -> str:
    return path.parent.name if path.name == "model.onnx" and path.parent.name else path.stem


def run(args: argparse.Namespace) -> int:
    from builder.evaluate.evaluate import evaluate, load_eval_data
    from builder.evaluate.render import format_accuracy
    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.graph.report import GraphReport
    from calib.artifact_io import atomic_write_text
    from calib.errors import ConfigError

    _check_counts(args)
    if args.graph_report is not None and not args.graph_report.is_file():
        raise ConfigError(f"GraphReport file {args.graph_report} does not exist")
    reference = load_model(args.reference)
    model = load_model(args.model)
    if args.graph_report is not None:
        report = GraphReport.from_json(args.graph_report.read_text(encoding="utf-8"))
    else:
        report = analyze(reference, name=args.reference.stem)
    data = load_eval_data(
        seed=args.seed,
        train_limit=args.train_samples,
        test_limit=args.test_samples,
        layer_sentences=args.layer_sentences,
    )
    name = args.name or _model_name(args.model)
    result = evaluate(reference, model, report, data, name=name, refit=not args.no_refit)
    print(format_accuracy(result), end="")
    if args.output is not None:
        atomic_write_text(args.output, result.to_json())
        print(f"wrote {args.output}")
    return 0
