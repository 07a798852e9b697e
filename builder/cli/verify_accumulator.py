"""CLI stage: ``build-engine verify-accumulator`` -- prove that no integer GEMM overflows a P-bit accumulator."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = """\
Prove that no integer GEMM of a Q/DQ ONNX model can overflow a signed P-bit accumulator.

For every MatMul/Gemm whose weight is an integer initializer behind a DequantizeLinear, and for every output
channel (and tile of --tile inputs, each summed in its own P-bit accumulator), computes the worst-case integer
dot product over all activations in range: x_max * (sum of positive weights) + x_min * (sum of negative
weights), and the symmetric lower side. The model is proved safe when every one fits in
[-2^(P-1), 2^(P-1) - 1]; otherwise the channels that can overflow are listed with their margins. The bound
holds for any accumulation order inside a tile. Activations are full-range N-bit integers: signed
[-2^(N-1), 2^(N-1) - 1] (INT8 Q/DQ: [-128, 127]) or unsigned [0, 2^N - 1].
"""

EPILOG = """\
examples:
  build-engine verify-accumulator engines/minilm/model.onnx --accumulator-bits 32
  build-engine verify-accumulator model.onnx --accumulator-bits 16 --activation-bits 8 --tile 128
  build-engine verify-accumulator model.onnx --accumulator-bits 16 --unsigned --json overflow.json

exit codes: 0 proved (no overflow possible), 3 overflow possible (or no integer GEMM / unreadable model),
2 bad flag or a tile larger than some GEMM's K
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="Q/DQ ONNX model file")
    parser.add_argument("--accumulator-bits", type=int, required=True, metavar="P",
                        help="signed accumulator width P to prove (e.g. 16 or 32)")
    parser.add_argument("--activation-bits", type=int, default=8, metavar="N",
                        help="activation width N (default 8)")
    sign = parser.add_mutually_exclusive_group()
    sign.add_argument("--signed", dest="signed", action="store_true", default=True,
                      help="activations are signed [-2^(N-1), 2^(N-1)-1] (default; INT8 Q/DQ)")
    sign.add_argument("--unsigned", dest="signed", action="store_false",
                      help="activations are unsigned [0, 2^N-1] (e.g. after ReLU/GELU with UINT8)")
    parser.add_argument("--tile", type=int, default=None, metavar="T",
                        help="inputs per accumulator tile (multi-stage accumulation); default: the whole K")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the AccumulatorReport as JSON to PATH")
    parser.add_argument("--show", type=int, default=5, metavar="COUNT",
                        help="channels listed per GEMM that can overflow (default 5)")
    parser.add_argument("--quiet", action="store_true", help="print only the verdict line")


def run(args: argparse.Namespace) -> int:
    from builder.engine.outputs import check_output_file
    from builder.graph.load import load_model
    from builder.verify.accumulator import AccumulatorSpec, format_report, verify_model
    from calib.artifact_io import atomic_write_text
    from calib.errors import ConfigError
    from calib.schema import to_json

    if args.show < 0:
        raise ConfigError(f"--show {args.show} must be 0 or more")
    if args.json is not None:  # one file written atomically: checked, not locked
        check_output_file(args.json)
    spec = AccumulatorSpec(accumulator_bits=args.accumulator_bits, activation_bits=args.activation_bits,
                           signed_inputs=args.signed, tile=args.tile)
    path: Path = args.model
    report = verify_model(load_model(path), spec, name=path.stem, max_listed=max(args.show, 10))
    text = format_report(report, show=args.show)
    print(text.splitlines()[-1] if args.quiet else text.rstrip("\n"))
    if args.json is not None:
        atomic_write_text(args.json, to_json(report))
        print(f"wrote {args.json}")
    return 0 if report.proved else 3
