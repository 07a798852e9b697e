"""Benchmark (part of ``bench.calibration``): sharded calibration on Ray with 1, 2, ... workers.

Each worker count runs in a child process: it connects to Ray (``local``: a private instance on 127.0.0.1
with exactly that many CPUs; else the cluster at the address), runs the sharded collection once to start the
workers (imports, model load), then times a second run into a fresh folder: the wall time until every shard
is in, the throughput in sentences per second, and the exact merge of the shards. Each task is one worker of
one thread (ONNX Runtime and the fold); there are as many shards as workers. The in-process one-thread run
(the same task body, no Ray) is the reference the speed-up is taken against.

A ``local`` Ray runs in a network namespace of its own holding only the loopback interface (when this runs as
root with ``unshare``): Ray would otherwise bind its processes to the machine's outward-facing address even
for a single-machine instance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _inputs(samples: int) -> tuple[Path, list[str], list[Any], Any]:
    from bench.calibration import _setup
    from builder.pipeline import analyze_model, calibration_tensors
    from calib.collect import CollectOptions

    path, model, feeds = _setup(samples)
    tensors = calibration_tensors(model, analyze_model(model))
    return path, tensors, feeds, CollectOptions(data_source=f"vader:{samples}")


def _timed_run(path: Path, tensors: list[str], feeds: list[Any], options: Any, config: Any) -> Any:
    from builder.distributed.ray_calibrate import collect_sharded

    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        return collect_sharded(path, feeds, tensors, options, Path(tmp), config)


def run_workers(samples: int, workers: str, address: str = "local") -> dict[str, Any]:
    """Time the sharded collection with ``workers`` one-thread workers (``0``: in-process, one thread)."""
    from builder.distributed.ray_calibrate import ShardConfig

    count = int(workers)
    path, tensors, feeds, options = _inputs(samples)
    if count == 0:  # the task body in this process, one thread for inference and one for the fold
        import dataclasses

        from builder.distributed.ray_calibrate import collect_shard
        from calib.collect import load_model_bytes

        model_bytes, sha = load_model_bytes(path)
        started = time.perf_counter()
        collect_shard(model_bytes, sha, feeds, tensors, dataclasses.replace(options, threads=1, fold_threads=1))
        seconds = time.perf_counter() - started
        return {"workers": 0, "seconds": seconds, "collect_s": seconds, "merge_s": 0.0, "shards": 1}
    import ray

    if address == "local":  # workers at the driver's priority (Ray lowers theirs), as the in-process reference
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=count, include_dashboard=False, configure_logging=False, log_to_driver=False)
    else:
        ray.init(address=address, configure_logging=False, log_to_driver=False)
    try:
        config = ShardConfig(shards=count, address="auto", cpus_per_shard=1)
        cold_started = time.perf_counter()
        _timed_run(path, tensors, feeds, options, config)  # starts the workers
        cold = time.perf_counter() - cold_started
        started = time.perf_counter()
        result = _timed_run(path, tensors, feeds, options, config)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    return {"workers": count, "seconds": seconds, "cold_s": cold, "collect_s": result.collect_s,
            "merge_s": result.merge_s, "shards": result.shards, "cpus": os.cpu_count()}


def _loopback_only(command: list[str]) -> list[str]:
    """``command`` in a fresh network namespace with only ``lo`` up, where that can be made (else as it is)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return command
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *command]


def scale_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Spawn one child per worker count (plus the in-process reference) and print the table."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        print("\nsharded calibration on Ray: skipped (Ray is not installed: pip install 'build-engine[ray]')")
        return []
    counts = [0] + [int(w) for w in str(args.workers).split(",") if w.strip()]
    rows = []
    print(f"\nsharded calibration on Ray ({args.ray_address}), one thread per worker, as many shards as workers:")
    print(f"{'workers':>8} {'collect s':>10} {'sentences/s':>12} {'speed-up':>9} {'merge ms':>9} {'cold s':>8}")
    reference = None
    for count in counts:
        command = [sys.executable, "-m", "bench.calibration", "--child", f"ray:{count}", "--samples",
                   str(args.samples), "--ray-address", args.ray_address]
        if args.ray_address == "local":
            command = _loopback_only(command)
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            error = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"{count:>8} failed: {error}")
            rows.append({"workers": count, "error": error})
            continue
        row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        reference = reference or row["collect_s"]
        row["sentences_per_s"] = args.samples / row["collect_s"]
        row["speedup"] = reference / row["collect_s"]
        rows.append(row)
        label = "in-proc" if count == 0 else str(count)
        cold = f"{row['cold_s']:.1f}" if "cold_s" in row else "-"
        print(f"{label:>8} {row['collect_s']:>10.2f} {row['sentences_per_s']:>12.0f} {row['speedup']:>8.2f}x "
              f"{row['merge_s'] * 1e3:>9.1f} {cold:>8}")
    return rows
