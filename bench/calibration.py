"""Benchmark: our calibration against its floor (a plain FP32 forward pass) and ONNX Runtime's calibrators.

Three comparisons on the bundled MiniLM and the same VADER calibration sentences, each configuration in a
child process of its own (wall time, CPU time and peak RSS are its own):

1. The floor: a plain ONNX Runtime session (default options) running every calibration batch. Our collection
   pass (``calib.collect.collect``: the tensors ``build-engine calibrate`` observes, every observer) runs the
   same batches; one pass serves every range method, which are decided afterwards from the one Statistics,
   so the ratio that matters is collection / floor (each method's range decision is timed on its own).
   Floor and collection alternate ``--repeat`` times; medians are reported.
2. ONNX Runtime's calibrators (``create_calibrator``: MinMax, Percentile 99.99, Entropy with 2048 bins -> 128
   levels; Distribution is its FP8 calibrator and has no INT8 counterpart) against ours on the same tensors
   (inputs and outputs of every MatMul, ``quantize_static``'s MatMul-only selection): our time is a
   collection pass with the observers the method needs (``minmax`` for max; ``minmax`` and ``histogram`` for
   percentile and entropy) plus that method's range decision; the every-observer pass is shown beside it.
   ONNX Runtime's histogram calibrators need equal-shape batches: its sentences are padded to the longest of
   the set (for every method, as ``quantize_static`` is fed); ours pad each batch to its own longest and
   exclude padding. ``--ort-chunk`` feeds ``collect_data`` that many batches at a time.
3. Scale-out (the ``[ray]`` extra): shards collected by 1 and 2 Ray workers of one thread each on a private
   Ray instance here (127.0.0.1), after a warm-up run; throughput in sentences/s and the cost of the exact
   merge of the shards. To measure a real cluster, pass ``--ray-address HOST:PORT`` (or ``auto`` on a node
   of it) and ``--workers 4,8,16``: the shards then run on its nodes.

Prints tables and writes ``engines/bench/calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT_PATH = Path("engines/bench/calibration.json")
ORT_METHODS = ("minmax", "percentile", "entropy")
OUR_METHODS = ("max", "percentile", "entropy", "mse")
PERCENTILE = 99.99
BATCH = 16


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _setup(samples: int) -> tuple[Path, Any, list[dict[str, np.ndarray]]]:
    """The MiniLM file, the loaded model and the calibration feeds ``build-engine calibrate`` would make."""
    import onnx

    from builder.cli.steps import CalibSettings, calibration_feeds
    from builder.intake.minilm import ensure_minilm_onnx

    path = ensure_minilm_onnx()
    settings = CalibSettings(samples=samples, batch_size=BATCH)
    return path, onnx.load(str(path)), calibration_feeds(settings, settings.encoder(path))


def matmul_tensors(model: Any) -> list[str]:
    """Float activations in and out of every MatMul (``quantize_static``'s MatMul-only selection)."""
    initializers = {i.name for i in model.graph.initializer}
    names = [t for n in model.graph.node if n.op_type == "MatMul" for t in (*n.input, *n.output)]
    return [t for t in dict.fromkeys(names) if t and t not in initializers]


def _spec(method: str) -> Any:
    from calib.range_table import RangeMethod
    from calib.ranges import RangeSpec

    return RangeSpec(method=RangeMethod(method), percentile=PERCENTILE if method == "percentile" else None)


def _run_floor(samples: int) -> dict[str, Any]:
    import onnxruntime as ort

    path, _, feeds = _setup(samples)
    started = time.perf_counter()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for feed in feeds:
        session.run(None, feed)
    return {"seconds": time.perf_counter() - started}


def _run_ours(samples: int, tensor_set: str, kinds: str) -> dict[str, Any]:
    """Our collection pass (``kinds``: every observer, or ``+``-joined observer kinds) and each range decision."""
    from builder.pipeline import analyze_model, calibration_tensors
    from calib.collect import CollectOptions, collect
    from calib.ranges import range_table

    path, model, feeds = _setup(samples)
    tensors = matmul_tensors(model) if tensor_set == "matmul" else calibration_tensors(model, analyze_model(model))
    options = CollectOptions(kinds=tuple(kinds.split("+"))) if kinds else CollectOptions()
    started = time.perf_counter()
    stats = collect(path, feeds, tensors, options).statistics
    collect_s = time.perf_counter() - started
    methods, amax = {}, {}
    for method in OUR_METHODS if "histogram" in options.kinds else ("max",):
        begin = time.perf_counter()
        table = range_table(stats, _spec(method), model_name="minilm")
        methods[method] = time.perf_counter() - begin
        amax[method] = {k: table.get(k).amax for k in table}
    return {"seconds": collect_s, "tensors": len(tensors), "methods_s": methods, "amax": amax}


class _Reader:
    """ONNX Runtime CalibrationDataReader over fixed-shape batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _run_ort(method: str, samples: int, chunk: int) -> dict[str, Any]:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from builder.intake.minilm import ensure_minilm_onnx, tokenizer_json_path
    from calib.data import calibration_texts
    from calib.tokenize import encode, load_tokenizer

    path = ensure_minilm_onnx()
    texts = calibration_texts("vader", samples, 0)
    longest = max(len(e.ids) for e in load_tokenizer(tokenizer_json_path(), 128).encode_batch(texts))
    batches = list(encode(texts, tokenizer_json_path(), 128, BATCH, pad_to=longest))
    started = time.perf_counter()
    options: dict[str, Any] = {"symmetric": True}
    kind = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[method]
    if method == "percentile":
        options.update(num_bins=2048, percentile=PERCENTILE)
    elif method == "entropy":
        options.update(num_bins=2048, num_quantized_bins=128)
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(path, ["MatMul"], augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                       calibrate_method=kind, extra_options=options)
        step = chunk or len(batches)
        for start in range(0, len(batches), step):
            calibrator.collect_data(_Reader(batches[start:start + step]))
        data = calibrator.compute_data()
    ranges = {name: float(np.max(np.abs(np.concatenate([np.ravel(v) for v in r.range_value]))))
              for name, r in data.data.items()}  # (min, max) scalars, or arrays of one element (MinMax)
    return {"seconds": time.perf_counter() - started, "tensors": len(ranges), "amax": ranges}


def child(config: str, samples: int, chunk: int) -> dict[str, Any]:
    """Run one configuration in this process and report its wall time, CPU time and peak RSS."""
    baseline, cpu_before = _peak_rss_mb(), _cpu_s()
    side, _, arg = config.partition(":")
    if side == "floor":
        result = _run_floor(samples)
    elif side == "ours":
        tensor_set, _, kinds = arg.partition(":")
        result = _run_ours(samples, tensor_set, kinds)
    elif side == "ort":
        result = _run_ort(arg, samples, chunk)
    else:
        raise SystemExit(f"unknown configuration {config!r}")
    result.update({"config": config, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": baseline,
                   "cpu_s": _cpu_s() - cpu_before})
    return result


def _spawn(config: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.calibration", "--child", config, "--samples", str(args.samples),
               "--ort-chunk", str(args.ort_chunk)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"config": config, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _agreement(ours: dict[str, float], theirs: dict[str, float]) -> float:
    """Median |log(amax_ours / amax_ort)| over shared tensors (0 = identical ranges)."""
    shared = [k for k in ours if k in theirs and ours[k] > 0 and theirs[k] > 0]
    return float(np.median([abs(math.log(ours[k] / theirs[k])) for k in shared])) if shared else math.nan


def _median(runs: list[dict[str, Any]], key: str = "seconds") -> float:
    return float(statistics.median(r[key] for r in runs))


def _floor_section(args: argparse.Namespace) -> dict[str, Any]:
    floors, ours = [], []
    for _ in range(args.repeat):  # alternate, so both see the same machine load
        floors.append(_spawn("floor", args))
        ours.append(_spawn("ours:calibrate:", args))
    failed = [r for r in floors + ours if "error" in r]
    if failed:
        print(f"floor comparison failed: {failed[0]['error']}")
        return {"error": failed[0]["error"]}
    floor_s, ours_s = _median(floors), _median(ours)
    methods = {m: float(statistics.median(r["methods_s"][m] for r in ours)) for m in OUR_METHODS}
    print(f"\nfloor: plain FP32 forward pass over {args.samples} VADER sentences (ORT defaults), median of "
          f"{args.repeat}: {floor_s:.2f} s (CPU {_median(floors, 'cpu_s'):.1f} s)")
    print(f"collection pass ({ours[0]['tensors']} tensors, every observer; serves every method): {ours_s:.2f} s "
          f"(CPU {_median(ours, 'cpu_s'):.1f} s) = {ours_s / floor_s:.2f}x the floor")
    for method in OUR_METHODS:
        total = ours_s + methods[method]
        print(f"  {method:<11} ranges decided in {methods[method]:.3f} s; calibration with this method "
              f"{total:.2f} s = {total / floor_s:.2f}x the floor")
    return {"floor_s": floor_s, "collect_s": ours_s, "ratio": ours_s / floor_s, "methods_s": methods,
            "floor_runs": floors, "collect_runs": [{k: v for k, v in r.items() if k != "amax"} for r in ours]}


def _ort_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """ONNX Runtime's calibrators against ours: the observers each method needs (minmax for max; minmax and the
    histogram for percentile and entropy), and the every-observer pass that serves all methods at once."""
    every = _spawn("ours:matmul", args)
    needed = {"minmax": _spawn("ours:matmul:minmax", args), "hist": _spawn("ours:matmul:minmax+histogram", args)}
    rows = []
    print("\nvs ONNX Runtime's calibrators (MatMul inputs/outputs): ours = collection pass + that method's ranges, "
          "with the observers the method needs / with every observer")
    print(f"{'method':<11} {'ours s':>8} {'every s':>8} {'ORT s':>8} {'speedup':>8} {'every':>7} {'CPU ours/ORT':>13} "
          f"{'ours MB':>8} {'ORT MB':>8} {'|log amax ratio|':>17}")
    for method in ORT_METHODS:
        ort = _spawn(f"ort:{method}", args)
        ours = needed["minmax" if method == "minmax" else "hist"]
        failed = next((r["error"] for r in (every, ours, ort) if "error" in r), None)
        if failed is not None:
            print(f"{method:<11} failed: {failed}")
            rows.append({"method": method, "error": failed})
            continue
        mine = {"minmax": "max"}.get(method, method)
        ours_s, every_s = ours["seconds"] + ours["methods_s"][mine], every["seconds"] + every["methods_s"][mine]
        row = {"method": method, "ours_s": ours_s, "every_observer_s": every_s, "ort_s": ort["seconds"],
               "speedup": ort["seconds"] / ours_s, "speedup_every_observer": ort["seconds"] / every_s,
               "ours_cpu_s": ours["cpu_s"], "ort_cpu_s": ort["cpu_s"], "ours_peak_rss_mb": ours["peak_rss_mb"],
               "ort_peak_rss_mb": ort["peak_rss_mb"], "tensors": ours["tensors"], "ort_tensors": ort["tensors"],
               "median_abs_log_amax_ratio": _agreement(ours["amax"][mine], ort["amax"])}
        rows.append(row)
        cpu = f"{row['ours_cpu_s']:.0f}/{row['ort_cpu_s']:.0f}"
        print(f"{method:<11} {ours_s:>8.2f} {every_s:>8.2f} {ort['seconds']:>8.2f} {row['speedup']:>7.1f}x "
              f"{row['speedup_every_observer']:>6.1f}x {cpu:>13} {row['ours_peak_rss_mb']:>8.0f} "
              f"{row['ort_peak_rss_mb']:>8.0f} {row['median_abs_log_amax_ratio']:>17.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="floor/collection pairs (medians reported)")
    parser.add_argument("--ort-chunk", type=int, default=4,
                        help="batches per ORT collect_data call (default 4 = 64 sentences; 0: all at once)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts of the scale-out section ('' skips)")
    parser.add_argument("--ray-address", default="local", help="local (a private Ray here) or a cluster address")
    parser.add_argument("--skip-ort", action="store_true", help="skip the ONNX Runtime comparison")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    args = parser.parse_args(argv)
    if args.child:
        if args.child.startswith("ray:"):
            from bench.calibration_scale import run_workers

            print(json.dumps(run_workers(args.samples, args.child.removeprefix("ray:"), args.ray_address)))
            return 0
        print(json.dumps(child(args.child, args.samples, args.ort_chunk)))
        return 0
    print(f"calibration of MiniLM on {args.samples} VADER sentences (2-core CPU unless stated)")
    report: dict[str, Any] = {"samples": args.samples, "percentile": PERCENTILE, "ort_chunk": args.ort_chunk}
    report["floor"] = _floor_section(args)
    report["ort"] = [] if args.skip_ort else _ort_section(args)
    if args.workers:
        from bench.calibration_scale import scale_section

        report["scale"] = scale_section(args)
    from calib.artifact_io import atomic_write_json

    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
