"""`make bench` entry point: runs every CPU benchmark module that imports, each through its ``main() -> int``.

A module that cannot be imported (an optional dependency missing) is reported and skipped; the exit code is
the first non-zero code of the modules that ran.
"""

from __future__ import annotations

import importlib
import sys
import time

MODULES = ("bench.calibration", "bench.calibration_budget", "bench.accuracy", "bench.weights", "bench.build",
           "bench.decoder", "bench.weights_decoder")


def main(argv: list[str] | None = None) -> int:
    selected = list(argv if argv is not None else sys.argv[1:]) or list(MODULES)
    status = 0
    for name in selected:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            print(f"== {name}: skipped ({exc})")
            continue
        print(f"== {name}")
        started = time.perf_counter()
        code = int(module.main([]))
        print(f"== {name}: exit {code} in {time.perf_counter() - started:.0f} s")
        status = status or code
    return status


if __name__ == "__main__":
    sys.exit(main())
