"""CLI stage: ``build-engine calibrate`` -- collect activation statistics on real text and write the RangeTable."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

HELP = """\
Calibrate an ONNX model on real text: observe its activations and decide INT8 ranges.

Runs ONNX Runtime over tokenized text (padding excluded), folds each observed tensor into streaming observers
(abs-max, TensorRT's 2048-bin |x| histogram, per-dimension min/max, per-token max) and decides one range per
tensor with --method: max, percentile (--percentile 99.9 / 99.99 / 99.999 / any), entropy (TensorRT
EntropyCalibration2) or mse. Observed tensors come from the graph analysis (GEMM inputs, LayerNorm, softmax,
FFN and residual outputs). Writes ranges.json (RangeTable), calibration.cache (TensorRT's text format) and
calibration_state.npz (observer states: an interrupted run resumes from it; a finished one is reused).
--report adds the outlier report (outliers.md / .json and per-dimension range plots).
Data: vader (rated movie sentences; calibration split disjoint from evaluation), lee (gensim Lee background
corpus) or a .txt (one text per line) / .jsonl ({"text": ...} per line) file: --calib-data, the flag every
command shares (--data is kept as its alias).
"""

EPILOG = """\
examples:
  build-engine calibrate model.onnx --calib-data vader --samples 512 --method entropy -o engines/minilm
  build-engine calibrate model.onnx --method percentile --percentile 99.99 --report -o engines/minilm
  build-engine calibrate model.onnx --calib-data texts.jsonl --method mse --granularity group --groups 6

exit codes: 0 ok, 2 bad flag or file, 3 unreadable model, bad or empty calibration data, non-finite activations
"""

METHODS = ("max", "percentile", "entropy", "mse")
GRANULARITIES = ("tensor", "channel", "group")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="ONNX model file (float)")
    from builder.cli.run import add_calib_data_arguments

    add_calib_data_arguments(parser.add_argument_group("calibration data"))
    ranges = parser.add_argument_group("ranges")
    ranges.add_argument("--method", choices=METHODS, default="entropy", help="range method (default: entropy)")
    ranges.add_argument("--percentile", type=float, help="percentile for --method percentile, e.g. 99.99")
    ranges.add_argument("--granularity", choices=GRANULARITIES, default="tensor", help="default: tensor")
    ranges.add_argument("--groups", type=int, help="number of embedding groups K for --granularity group")
    ranges.add_argument("--bins", type=int, default=2048, help="initial histogram bins (default: 2048)")
    ranges.add_argument("--tensor", action="append", dest="tensors", metavar="NAME",
                        help="observe this tensor (repeatable; default: chosen from the graph analysis)")
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", type=Path, help="output folder (default: engines/<model name>)")
    out.add_argument("--report", action="store_true", help="also write the outlier report and plots")
    out.add_argument("--trt-version", default="10.3.0", help="TensorRT version in the cache header (default: 10.3.0)")
    out.add_argument("--fresh", action="store_true", help="ignore an existing calibration_state.npz")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import onnx

    from builder.cli.run import calib_settings
    from builder.cli.steps import (
        STATE_FILE,
        collect_statistics,
        tensor_labels,
        write_outliers,
        write_ranges,
    )
    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.graph.targets import calibration_tensors
    from calib.cache import tensorrt_header
    from calib.calibrate import RangeSpec, range_table
    from calib.errors import ConfigError
    from calib.range_table import Granularity, RangeMethod

    spec = RangeSpec(method=RangeMethod(args.method), percentile=args.percentile,
                     granularity=Granularity(args.granularity), num_groups=args.groups)
    header = tensorrt_header(args.trt_version)
    settings = replace(calib_settings(args), bins=args.bins)
    model: onnx.ModelProto = load_model(args.model)
    name = args.model.stem
    output: Path = args.output or Path("engines") / name
    report = analyze(model, name=name)
    tensors = list(args.tensors) if args.tensors else calibration_tensors(model, report)
    if spec.num_groups is not None and report.hidden_size and report.hidden_size % spec.num_groups:
        raise ConfigError(f"--groups {spec.num_groups} must divide the hidden size {report.hidden_size}")
    started = time.perf_counter()
    collection = collect_statistics(args.model, tensors, settings, output, fresh=args.fresh,
                                    progress=not args.no_progress)
    collected_s = time.perf_counter() - started
    data_source = f"{args.calib_data}:{collection.samples}"
    write_ranges(range_table(collection, spec, model_name=name, data_source=data_source), output, header)
    if collection.resumed_batches:
        print(f"reused {collection.resumed_batches} of {collection.batches} batches from {output / STATE_FILE}")
    print(f"calibrated {len(tensors)} tensors on {collection.samples} texts ({args.calib_data}) "
          f"in {collected_s:.1f} s: "
          f"method {spec.method.value}{'' if spec.percentile is None else f' {spec.percentile:g}'}, "
          f"granularity {spec.granularity.value}")
    print(f"wrote {output / 'ranges.json'}, {output / 'calibration.cache'}, {output / STATE_FILE}")
    if args.report:
        outliers, written = write_outliers(collection.stats, tensor_labels(report), output,
                                           settings.tokenizer_path())
        dims = ", ".join(f"{d} ({n} tensors)" for d, n in list(outliers.dimension_counts().items())[:6])
        print(f"outlier dimensions: {dims or 'none'}")
        print("wrote " + ", ".join(str(p) for p in written))
    return 0
