"""``python -m tests.ray_driver CPUS [RESOURCES_JSON] -- BUILD-ENGINE ARGS...``: a private Ray, then the CLI.

Starts ``ray.init`` with CPUS CPUs (and the given custom resources), runs ``build-engine ARGS`` in this
process (so ``--ray auto`` uses that instance) and exits with its code. Tests run it inside a loopback-only
network namespace (tests.loopback), so Ray listens on and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    split = argv.index("--")
    settings, cli = argv[:split], argv[split + 1:]
    import ray

    from builder.cli.main import main as build_engine

    resources = json.loads(settings[1]) if len(settings) > 1 else None
    ray.init(num_cpus=int(settings[0]), resources=resources, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    try:
        return build_engine(cli)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
