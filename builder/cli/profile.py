"""CLI stage: ``build-engine profile`` -- latency sweep (batch x sequence) -> latency.json + PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = """Measure latency of ONNX models (ONNX Runtime) and engines (TensorRT) over a batch x sequence sweep.

TARGET is an .onnx file or an engine folder, optionally labelled LABEL=PATH. Engine folders are profiled
on TensorRT (GPU only; skipped with a message otherwise) and their model.onnx on ONNX Runtime. Each point
warms up, then times at least --iterations runs (and --duration-s seconds) and reports mean, median,
p90/p95/p99 and throughput as trtexec does, with host-to-device, compute and device-to-host apart on GPUs.
Writes latency.json, latency_vs_batch.png and, with --accuracy, accuracy_vs_latency.png.
"""

EPILOG = """\
examples:
  build-engine profile fp32=model.onnx int8=engines/minilm-int8 --batch 1,8 --seq 32,128 -o engines/report
  build-engine profile engines/minilm-int8 --device cpu --device cuda --iterations 200 --warmup-ms 500
  build-engine profile fp32=model.onnx int8=q.onnx --accuracy accuracy.json --plot-at 8x128

exit codes: 0 ok, 2 bad input, 5 requested runtime not installed
"""


DEFAULT_OUTPUT = Path("engines/profile")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("targets", nargs="+", help="[LABEL=]PATH of an .onnx file or an engine folder")
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="output folder")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    parser.add_argument("--seq", default="32,128", help="comma-separated sequence lengths (default: 32,128)")
    parser.add_argument("--device", action="append", choices=["cpu", "cuda"], help="ONNX Runtime device(s) "
                        "(default: cpu)")
    parser.add_argument("--no-tensorrt", action="store_true", help="skip TensorRT profiling of engine folders")
    parser.add_argument("--iterations", type=int, default=50, help="minimum timed runs per point (default: 50)")
    parser.add_argument("--duration-s", type=float, default=0.0, help="minimum timed seconds per point")
    parser.add_argument("--warmup-ms", type=float, default=200.0, help="warm-up per point in ms (default: 200)")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json for token inputs (default: bundled MiniLM)")
    parser.add_argument("--accuracy", type=Path, action="append", default=[],
                        help="accuracy report JSON or {label: accuracy} map (repeatable)")
    parser.add_argument("--plot-at", default=None, help="BxS point of the accuracy plot (default: largest)")


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from calib.errors import ConfigError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of integers") from None
    if not values:
        raise ConfigError(f"{flag} is empty")
    return values


def _tokenizer(args: argparse.Namespace) -> Path | None:
    if args.tokenizer is not None:
        return Path(args.tokenizer)
    from builder.intake.minilm import tokenizer_json_path
    from calib.errors import BackendUnavailable

    try:
        return tokenizer_json_path()
    except BackendUnavailable:
        return None


def run(args: argparse.Namespace) -> int:
    from builder.cli.lock import claim_output_dir

    with claim_output_dir(args.output, "profile", parents=args.output == DEFAULT_OUTPUT):  # the default may be new
        return _profile(args)


def _profile(args: argparse.Namespace) -> int:
    from builder.profile.ort import TimingConfig
    from builder.profile.plots import plot_accuracy_vs_latency, plot_latency_vs_batch, read_accuracy
    from builder.profile.sweep import ProfileTarget, SweepConfig, run_sweep
    from calib.artifact_io import atomic_write_text
    from calib.errors import ConfigError

    targets = [ProfileTarget.parse(t) for t in args.targets]
    config = SweepConfig(
        batches=_ints(args.batch, "--batch"),
        seqs=_ints(args.seq, "--seq"),
        devices=tuple(args.device or ["cpu"]),
        tensorrt=not args.no_tensorrt,
        timing=TimingConfig(warmup_ms=args.warmup_ms, iterations=args.iterations, duration_s=args.duration_s,
                            threads=args.threads),
    )
    accuracy: dict[str, float] = {}
    for path in args.accuracy:
        accuracy.update(read_accuracy(path))
    plot_b, plot_s = max(config.batches), max(config.seqs)
    if args.plot_at:
        b_text, _, s_text = args.plot_at.partition("x")
        if not (b_text.isdigit() and s_text.isdigit()):
            raise ConfigError(f"--plot-at {args.plot_at!r} is not BATCHxSEQ (for example 8x128)")
        plot_b, plot_s = int(b_text), int(s_text)
    report = run_sweep(targets, config, _tokenizer(args))
    atomic_write_text(args.output / "latency.json", report.to_json())
    for line in report.skipped:
        print(f"skipped: {line}")
    print(f"{'label':<16} {'runtime':<18} {'batch':>5} {'seq':>4} {'mean ms':>9} {'p50':>8} {'p99':>8} {'seq/s':>8}")
    for r in report.results:
        print(f"{r.label:<16} {r.runtime:<18} {r.batch:>5} {r.seq:>4} {r.latency.mean_ms:>9.2f} "
              f"{r.latency.median_ms:>8.2f} {r.latency.p99_ms:>8.2f} {r.sequences_per_s:>8.1f}")
    if report.results:
        plot_latency_vs_batch(report, args.output / "latency_vs_batch.png")
    if accuracy and report.results:
        plot_accuracy_vs_latency(report, accuracy, args.output / "accuracy_vs_latency.png", batch=plot_b, seq=plot_s)
    print(f"wrote {args.output / 'latency.json'}")
    return 0
