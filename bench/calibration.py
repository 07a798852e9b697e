"""Benchmark: our calibration vs ONNX Runtime ``quantize_static``'s calibrators on the same sentences.

Both sides observe the same tensors (inputs and outputs of every MatMul, the set ``quantize_static`` picks with
``op_types_to_quantize=["MatMul"]``) of the bundled MiniLM on the same VADER calibration sentences and
compute Percentile (99.99) and Entropy (2048 bins -> 128 levels) ranges. Each configuration runs in its own
child process, so wall time (model load, collection, range computation), CPU time and peak RSS are its own.

ONNX Runtime's histogram calibrators need equal-shape batches: its sentences are padded to the longest of
the set (batch 16); ours pads each batch to its own longest and excludes padding from the statistics.
``--ort-chunk`` feeds ONNX Runtime's ``collect_data`` that many batches at a time (default 4; 0: all at once, as
``quantize_static`` does; it keeps every batch's activations in memory until the end).

Prints a table and writes ``engines/bench/calibration.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT_PATH = Path("engines/bench/calibration.json")
CONFIGS = ("ours:percentile", "ours:entropy", "ort:percentile", "ort:entropy")
PERCENTILE = 99.99
BATCH = 16


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads (steadier than wall time on a shared machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _texts(samples: int) -> list[str]:
    from calib.data import vader_splits

    return [s.text for s in vader_splits(seed=0, calibration=samples).calibration]


def matmul_tensors(model: Any) -> list[str]:
    """Float activations in and out of every MatMul (``quantize_static``'s MatMul-only selection)."""
    initializers = {i.name for i in model.graph.initializer}
    names = [t for n in model.graph.node if n.op_type == "MatMul" for t in (*n.input, *n.output)]
    return [t for t in dict.fromkeys(names) if t and t not in initializers]


def _run_ours(model_path: Path, method: str, samples: int) -> dict[str, Any]:
    import onnx

    from builder.intake.minilm import tokenizer_json_path
    from calib.calibrate import RangeSpec, range_table
    from calib.collect import collect
    from calib.range_table import RangeMethod
    from calib.tokenize import encode

    started = time.perf_counter()
    model = onnx.load(str(model_path))
    tensors = matmul_tensors(model)
    feeds = encode(_texts(samples), tokenizer_json_path(), 128, BATCH, sort_by_length=True)
    collection = collect(model, feeds, tensors)
    spec = RangeSpec(method=RangeMethod(method), percentile=PERCENTILE if method == "percentile" else None)
    table = range_table(collection, spec, model_name="minilm", data_source="vader")
    return {"seconds": time.perf_counter() - started, "tensors": len(table.ranges),
            "amax": {k: table.get(k).amax for k in table}}


class _Reader:
    """ONNX Runtime CalibrationDataReader over fixed-shape batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _run_ort(model_path: Path, method: str, samples: int, chunk: int) -> dict[str, Any]:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from builder.intake.minilm import tokenizer_json_path
    from calib.tokenize import encode, load_tokenizer

    started = time.perf_counter()
    texts = _texts(samples)
    longest = max(len(e.ids) for e in load_tokenizer(tokenizer_json_path(), 128).encode_batch(texts))
    batches = list(encode(texts, tokenizer_json_path(), 128, BATCH, pad_to=longest))
    options: dict[str, Any] = {"num_bins": 2048, "symmetric": True}
    if method == "percentile":
        options["percentile"] = PERCENTILE
        calibrate_method = CalibrationMethod.Percentile
    else:
        options["num_quantized_bins"] = 128
        calibrate_method = CalibrationMethod.Entropy
    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(model_path, ["MatMul"], augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                       calibrate_method=calibrate_method, extra_options=options)
        step = chunk or len(batches)
        for start in range(0, len(batches), step):
            calibrator.collect_data(_Reader(batches[start:start + step]))
        data = calibrator.compute_data()
    ranges = {name: float(max(abs(float(r.range_value[0])), abs(float(r.range_value[1]))))
              for name, r in data.data.items()}
    return {"seconds": time.perf_counter() - started, "tensors": len(ranges), "amax": ranges,
            "padded_length": longest}


def child(config: str, samples: int, chunk: int) -> dict[str, Any]:
    """Run one configuration in this process and report its wall time and peak RSS."""
    from builder.intake.minilm import ensure_minilm_onnx

    model_path = ensure_minilm_onnx()
    baseline, cpu_before = _peak_rss_mb(), _cpu_s()
    side, method = config.split(":")
    result = _run_ours(model_path, method, samples) if side == "ours" else _run_ort(model_path, method, samples,
                                                                                     chunk)
    result.update({"config": config, "peak_rss_mb": _peak_rss_mb(), "rss_before_mb": baseline,
                   "cpu_s": _cpu_s() - cpu_before})
    return result


def _spawn(config: str, samples: int, chunk: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "bench.calibration", "--child", config, "--samples", str(samples),
                           "--ort-chunk", str(chunk)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"config": config, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _agreement(ours: dict[str, float], theirs: dict[str, float]) -> float:
    """Median |log(amax_ours / amax_ort)| over shared tensors (0 = identical ranges)."""
    shared = [k for k in ours if k in theirs and ours[k] > 0 and theirs[k] > 0]
    return float(np.median([abs(math.log(ours[k] / theirs[k])) for k in shared])) if shared else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--ort-chunk", type=int, default=4,
                        help="batches per ORT collect_data call (default 4 = 64 sentences; 0: all at once)")
    parser.add_argument("--only", choices=("percentile", "entropy"), help="benchmark one method")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.samples, args.ort_chunk)))
        return 0
    methods = [args.only] if args.only else ["percentile", "entropy"]
    results = {c: _spawn(c, args.samples, args.ort_chunk) for m in methods for c in (f"ours:{m}", f"ort:{m}")}
    rows = []
    print(f"calibration of MiniLM on {args.samples} VADER sentences (MatMul inputs/outputs, 2-core CPU)")
    print(f"{'method':<11} {'ours s':>8} {'ORT s':>8} {'speedup':>8} {'CPU s ours/ORT':>15} {'CPU ratio':>9} "
          f"{'ours MB':>8} {'ORT MB':>8} {'mem ratio':>9}")
    for method in methods:
        ours, ort = results[f"ours:{method}"], results[f"ort:{method}"]
        if "error" in ours or "error" in ort:
            print(f"{method:<11} failed: {ours.get('error') or ort.get('error')}")
            rows.append({"method": method, "ours": ours, "ort": ort})
            continue
        row = {"method": method, "ours_s": ours["seconds"], "ort_s": ort["seconds"],
               "speedup": ort["seconds"] / ours["seconds"], "ours_cpu_s": ours["cpu_s"], "ort_cpu_s": ort["cpu_s"],
               "cpu_ratio": ort["cpu_s"] / ours["cpu_s"], "ours_peak_rss_mb": ours["peak_rss_mb"],
               "ort_peak_rss_mb": ort["peak_rss_mb"], "memory_ratio": ort["peak_rss_mb"] / ours["peak_rss_mb"],
               "tensors": ours["tensors"], "ort_tensors": ort["tensors"], "ort_padded_length": ort["padded_length"],
               "median_abs_log_amax_ratio": _agreement(ours["amax"], ort["amax"])}
        rows.append(row)
        cpu = f"{row['ours_cpu_s']:.0f}/{row['ort_cpu_s']:.0f}"
        print(f"{method:<11} {row['ours_s']:>8.1f} {row['ort_s']:>8.1f} {row['speedup']:>7.1f}x {cpu:>15} "
              f"{row['cpu_ratio']:>8.1f}x {row['ours_peak_rss_mb']:>8.0f} {row['ort_peak_rss_mb']:>8.0f} "
              f"{row['memory_ratio']:>8.1f}x")
    from calib.artifact_io import atomic_write_json

    atomic_write_json(args.out, {"samples": args.samples, "ort_chunk": args.ort_chunk, "percentile": PERCENTILE,
                                 "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
