"""Benchmark peer (`make bench`, bench/weights.py): NVIDIA ModelOpt's ONNX INT4 weight-only quantizer, own venv.

ModelOpt's ``[onnx]`` extra pulls onnxruntime-gpu and needs torch, so it runs from ``.venv-modelopt`` (the
Makefile's ``bench`` target creates it) and bench/weights.py calls this script through a subprocess:

    .venv-modelopt/bin/python bench/modelopt_int4_driver.py --model COPY.onnx --calib batches.npz \
        --method awq_lite --out quantized.onnx

``--model`` is a copy (ModelOpt may rewrite its input); ``--calib`` an ``.npz`` whose arrays are named
``<batch index>|<input name>`` (the calibration batches build-engine uses, one model run each). INT4 blocks of
128 inputs, no zero point, the CPU execution provider, FP32 elsewhere (ModelOpt's INT4 path quantizes MatMul
weights only; opset 21). Prints one JSON line: version, method, seconds, peak RSS. Imports nothing from this
repo.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any


def _batches(path: Path) -> list[dict[str, Any]]:
    import numpy as np

    batches: dict[int, dict[str, Any]] = {}
    with np.load(path) as data:
        for key in data.files:
            index, name = key.split("|", 1)
            batches.setdefault(int(index), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelopt_int4_driver.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="ONNX model (a copy: ModelOpt may rewrite it)")
    parser.add_argument("--calib", type=Path, required=True, help=".npz of calibration batches ('<i>|<input>')")
    parser.add_argument("--method", choices=("rtn_dq", "awq_clip", "awq_lite"), required=True)
    parser.add_argument("--block", type=int, default=128, help="INT4 block size (default 128)")
    parser.add_argument("--out", type=Path, required=True, help="where the quantized ONNX is written")
    args = parser.parse_args(argv)

    from modelopt import __version__  # type: ignore[import-not-found]  # installed only in .venv-modelopt
    from modelopt.onnx.quantization import quantize  # type: ignore[import-not-found]
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, batches: list[dict[str, Any]]) -> None:
            self.batches = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.batches, None)

    batches = _batches(args.calib)
    started = time.perf_counter()
    quantize(onnx_path=str(args.model), quantize_mode="int4", calibration_method=args.method,
             calibration_data_reader=Reader(batches), calibration_eps=["cpu"], block_size=args.block,
             use_zero_point=False, high_precision_dtype="fp32", log_level="WARNING", output_path=str(args.out))
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"modelopt": __version__, "method": args.method, "seconds": seconds,
                      "batches": len(batches), "peak_rss_mib": round(peak_mib, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
