"""Benchmark peer (`make bench`, bench/decoder.py): NVIDIA ModelOpt's ONNX INT8 quantizer, run in its own venv.

ModelOpt's ``[onnx]`` extra pulls onnxruntime-gpu and needs torch, so it lives in ``.venv-modelopt`` (the Makefile's
``bench`` target creates it) and bench/decoder.py calls this script through a subprocess:

    .venv-modelopt/bin/python bench/modelopt_driver.py --model COPY.onnx --calib calib.npz --method max \
        --out quantized.onnx

``--model`` is a copy ModelOpt may rewrite (it writes beside and into its input); ``--calib`` an ``.npz`` of
calibration arrays keyed by model input (the same text build-engine calibrates on). The quantizer runs on the
CPU execution provider, quantizes MatMul only (what the ONNX Runtime baseline quantizes) and keeps the rest in
FP32, so the result runs on ONNX Runtime's CPU provider like every other row. Imports nothing from this repo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modelopt_driver.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="ONNX model (a copy: ModelOpt may rewrite it)")
    parser.add_argument("--calib", type=Path, required=True, help=".npz of calibration arrays keyed by input name")
    parser.add_argument("--method", choices=("max", "entropy"), required=True, help="ModelOpt calibration method")
    parser.add_argument("--out", type=Path, required=True, help="where the quantized ONNX is written")
    args = parser.parse_args(argv)

    import numpy as np
    from modelopt import __version__  # type: ignore[import-not-found]  # installed only in .venv-modelopt
    from modelopt.onnx.quantization import quantize  # type: ignore[import-not-found]

    with np.load(args.calib) as data:
        calibration = {name: data[name] for name in data.files}
    started = time.perf_counter()
    quantize(
        onnx_path=str(args.model),
        quantize_mode="int8",
        calibration_data=calibration,
        calibration_method=args.method,
        calibration_eps=["cpu"],
        op_types_to_quantize=["MatMul"],
        high_precision_dtype="fp32",
        output_path=str(args.out),
    )
    print(json.dumps({"modelopt": __version__, "method": args.method, "seconds": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
