"""CLI stage: ``build-engine analyze`` -- print the layers and roles of an ONNX model, or write the GraphReport."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = """\
Find the transformer layers of an ONNX model and the role of every node in them.

Recognises BERT-style (post-LN) and GPT-style (pre-LN) blocks: embedding LayerNorm, Q/K/V projections
(separate or fused), QK^T, softmax, PV, attention output projection, FFN fc1 / activation / fc2, residual
Adds and LayerNorms (the LayerNormalization op or its decomposed form), each with its layer index. Weight
GEMMs of an unrecognised architecture get the generic role "gemm" and a warning.
Supported: default-domain opsets 13..23; external data is read from the model's folder. Weights stored
weight-only quantized (integer initializers dequantized in the graph, as some INT8 exports ship them) are
folded back to float first, exactly, as every other command does.
"""

EPILOG = """\
examples:
  build-engine analyze model.onnx                     # print a table of layers and roles
  build-engine analyze model.onnx --json report.json  # also write the GraphReport artifact

exit codes: 0 ok, 2 missing file or bad flag, 3 unreadable model, unsupported opset or no GEMM
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="ONNX model file")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the GraphReport as JSON to PATH")
    parser.add_argument("--name", help="model name recorded in the report (default: the file name without .onnx)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")


def run(args: argparse.Namespace) -> int:
    from builder.engine.outputs import check_output_file
    from builder.graph.analyze import analyze
    from builder.graph.render import format_report
    from builder.intake.prepare import prepare_model
    from calib.artifact_io import atomic_write_text

    if args.json is not None:  # one file written atomically: checked, not locked
        check_output_file(args.json)
    path: Path = args.model
    prepared = prepare_model(path)  # weight-only quantized weights are folded, as every other command does
    if prepared.rewritten and not args.quiet:
        print(prepared.describe())
    report = analyze(prepared.model, name=args.name or path.stem)
    if not args.quiet:
        print(format_report(report), end="")
    if args.json is not None:
        atomic_write_text(args.json, report.to_json())
        print(f"wrote {args.json}")
    return 0
