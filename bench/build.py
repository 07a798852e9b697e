"""Benchmark (part of ``make bench``): engine build time per model, backend and builder optimization level.

Builds MiniLM FP32 (and any extra ONNX files given) with TensorRT-RTX ahead of time on this CPU, for one
architecture and for the default set of four, at optimization levels 0 (what the tests use) and 3 (the
default), each with the dynamic batch x sequence profile 1/8/32 x 1/128/128. Full TensorRT is added
when it imports (on a GPU machine). Results go to ``engines/bench/build.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from builder.backends.options import DEFAULT_RTX_ARCHITECTURES, BackendName, BuildOptions
from builder.backends.rtx import rtx_available
from builder.backends.tensorrt import tensorrt_available
from builder.engine.build import BuildInputs, build_engine
from calib.artifact_io import atomic_write_json


def _configs() -> list[tuple[BackendName, tuple[str, ...], int]]:
    configs: list[tuple[BackendName, tuple[str, ...], int]] = []
    if rtx_available():
        for archs in (("sm86",), DEFAULT_RTX_ARCHITECTURES):
            for level in (0, 3):
                configs.append((BackendName.TENSORRT_RTX, archs, level))
    if tensorrt_available():
        for level in (0, 3):
            configs.append((BackendName.TENSORRT, DEFAULT_RTX_ARCHITECTURES, level))
    return configs


def measure(models: dict[str, Path]) -> list[dict[str, Any]]:
    """Build every model with every available backend configuration; one row per build."""
    rows = []
    for label, path in models.items():
        for backend, archs, level in _configs():
            options = BuildOptions(backend=backend, architectures=archs, optimization_level=level)
            artifact = build_engine(BuildInputs(model_path=path), options, name=label)
            manifest = artifact.manifest
            rows.append({
                "model": label,
                "backend": f"{manifest.backend} {manifest.backend_version}",
                "architectures": ",".join(manifest.architectures),
                "optimization_level": level,
                "build_s": manifest.build_time_s,
                "plan_mib": round(manifest.plan_bytes / 2**20, 1),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extra", nargs="*", help="more [LABEL=]PATH.onnx models to build")
    parser.add_argument("--out", type=Path, default=Path("engines/bench/build.json"))
    args = parser.parse_args(argv)
    from builder.intake.minilm import ensure_minilm_onnx

    models = {"minilm-fp32": ensure_minilm_onnx()}
    for item in args.extra:
        label, sep, path = item.partition("=")
        models[label if sep else Path(item).stem] = Path(path if sep else item)
    if not _configs():
        print("no engine builder installed (pip install 'build-engine[rtx]'); nothing to measure")
        return 0
    rows = measure(models)
    header = f"{'model':<14} {'backend':<24} {'architectures':<22} {'opt':>3} {'build s':>8} {'plan MiB':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['model']:<14} {row['backend']:<24} {row['architectures']:<22} {row['optimization_level']:>3} "
              f"{row['build_s']:>8.2f} {row['plan_mib']:>9.1f}")
    host = {"machine": platform.machine(), "cpus": str(os.cpu_count()), "python": sys.version.split()[0]}
    atomic_write_json(args.out, {"host": host, "rows": rows})
    print(json.dumps({"wrote": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
