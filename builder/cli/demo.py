"""CLI stage: ``build-engine demo`` -- run the pipeline on the bundled all-MiniLM-L6-v2.

Each pipeline step is one small function; ``run`` calls them in order.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from builder.graph.report import GraphReport

HELP = """\
Run the pipeline on the bundled all-MiniLM-L6-v2 sentence encoder.

Exports the model to ONNX once (cached), then analyzes it and prints its layers and roles.
"""

EPILOG = """\
examples:
  build-engine demo
  build-engine demo --json minilm-report.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", type=Path, help="folder for the cached ONNX export (default: ~/.cache)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the GraphReport as JSON to PATH")


def export_step(cache_dir: Path | None) -> Path:
    """Export (or reuse) the MiniLM ONNX file."""
    from builder.intake.minilm import ensure_minilm_onnx

    path = ensure_minilm_onnx(cache_dir)
    print(f"[1/2] model: {path}")
    return path


def analyze_step(path: Path) -> GraphReport:
    """Load, check and analyze the export."""
    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.intake.minilm import MODEL_NAME

    report = analyze(load_model(path), name=MODEL_NAME)
    print(f"[2/2] analysis: {report.num_layers} layers, architecture {report.architecture}")
    return report


def report_step(report: GraphReport, json_path: Path | None) -> None:
    """Print the analysis table and write the artifact if asked."""
    from builder.graph.render import format_report
    from calib.artifact_io import atomic_write_text

    print()
    print(format_report(report), end="")
    if json_path is not None:
        atomic_write_text(json_path, report.to_json())
        print(f"wrote {json_path}")


def run(args: argparse.Namespace) -> int:
    path = export_step(args.cache_dir)
    report = analyze_step(path)
    report_step(report, args.json)
    return 0
