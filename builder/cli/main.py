"""CLI stage: the ``build-engine`` entry point.

Dispatches to one module per subcommand (see :mod:`builder.cli.registry`), maps :class:`ToolkitError`
to its exit code and prints a one-line message instead of a traceback; an ``OSError`` that escapes the
up-front output checks (disk full, a folder removed mid-run) is reported the same way with exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

from builder import __version__
from builder.cli.registry import PIPELINE_COMMAND, SUBCOMMANDS
from calib.errors import ToolkitError

DESCRIPTION = """\
build-engine: INT8 engine builder for transformer ONNX models (BERT- and GPT-style) targeting TensorRT.

Pipeline: ONNX -> analyze -> calibrate (real data) -> recipe -> Q/DQ ONNX -> TensorRT engine + manifest
-> Triton model repository -> latency profile and accuracy report.
"""

EPILOG = """\
examples:
  build-engine demo                                  # export the bundled MiniLM and run the pipeline
  build-engine analyze model.onnx                    # print layers and roles
  build-engine analyze model.onnx --json report.json # write the GraphReport artifact

exit codes: 0 ok, 2 usage or config, 3 graph or calibration, 4 build, 5 missing optional backend
"""


def _load(name: str) -> ModuleType:
    return importlib.import_module(SUBCOMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="build-engine",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"build-engine {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        module = _load(name)
        sub = subparsers.add_parser(
            name,
            help=str(module.HELP).splitlines()[0],
            description=str(module.HELP),
            epilog=getattr(module, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_module=module)
    return parser


def _normalize_argv(argv: list[str]) -> list[str]:
    """Route ``build-engine model.onnx ...`` to the one-shot pipeline subcommand."""
    if PIPELINE_COMMAND in SUBCOMMANDS and argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        return [PIPELINE_COMMAND, *argv]
    return argv


NOISY_LIBRARIES = ("matplotlib", "PIL", "numba", "urllib3", "filelock")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code."""
    args_list = _normalize_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(args_list)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for library in NOISY_LIBRARIES:  # their debug output (font matching, plugin scans) buries ours
        logging.getLogger(library).setLevel(max(level, logging.INFO))
    if getattr(args, "_module", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args))
    except ToolkitError as exc:
        print(f"build-engine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # the file system refused a write the checks could not foresee (disk full, a race)
        logging.getLogger(__name__).debug("file system error", exc_info=True)
        paths = " -> ".join(repr(str(p)) for p in (exc.filename, exc.filename2) if p is not None)
        print(f"build-engine: error: {paths + ': ' if paths else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build-engine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
