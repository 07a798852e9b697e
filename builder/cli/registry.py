"""CLI stage: the explicit registry of subcommands.

Each entry names a module in ``builder.cli`` that defines ``HELP: str``,
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args: argparse.Namespace) -> int``.
Those modules import only the standard library and lean project modules at import time, so that
``build-engine --help`` stays fast; heavy work is imported inside ``run``.
"""

from __future__ import annotations

# subcommand name -> module under builder.cli (order is the order shown in --help)
SUBCOMMANDS: dict[str, str] = {
    "run": "builder.cli.run",
    "demo": "builder.cli.demo",
    "analyze": "builder.cli.analyze",
    "calibrate": "builder.cli.calibrate",
    "quantize": "builder.cli.quantize",
    "build": "builder.cli.build",
    "export-triton": "builder.cli.export_triton",
    "profile": "builder.cli.profile",
    "evaluate": "builder.cli.evaluate",
    "sweep": "builder.cli.sweep",
    "search": "builder.cli.search",
    "verify-accumulator": "builder.cli.verify_accumulator",
}

# The one-shot pipeline runs when the first argument is not a subcommand (``build-engine model.onnx ...``).
PIPELINE_COMMAND = "run"
