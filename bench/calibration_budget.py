"""Benchmark: where calibration's time goes against its floor, and the lower bound of the collection design.

``bench.calibration`` compares whole runs. This module takes one collection pass apart, in one process, on the
bundled MiniLM and the same VADER sentences (its batches and tensors), each part timed ``--repeat`` times
(medians):

- floor: an ONNX Runtime session built from the file, then every batch (``bench.calibration``'s floor);
- one-time costs of a collection: reading the file, parsing it, hashing it, adding the observed tensors as
  graph outputs, building that session, and loading the compiled fold kernels (timed in a fresh child
  process, as every CLI run pays it);
- export: the instrumented session running every batch (the observed tensors come out, nothing is folded);
- fold: the CPU time of folding each batch's tensors into the observers on one thread, right after that batch
  ran (``calib.fold.observe``, every observer);
- collect: the real collection pass in this process (kernels already loaded), wall and CPU time.

From these it prints the lower bound of the design on this machine: the batches cannot stream faster than
``max(export wall, (export CPU + fold CPU) / cores)``, and with every one-time cost but the session gone a
collection cannot beat that bound plus the instrumented session. It also times the in-graph alternative with
ONNX Runtime's own operators: the valid rows gathered (padding dropped) and reduced by ReduceMin/ReduceMax per
column (what the ``minmax`` and ``dims`` observers need) or over the whole tensor (``minmax`` alone), in place of
exporting the tensors that have a feature axis last; the other tensors are left out, so these runs are lower
bounds for that route.

Last, the bound for the minmax method against ONNX Runtime's MinMax calibrator, on the tensors ``quantize_static``
observes (inputs and outputs of every MatMul; ``bench.calibration``'s comparison): the cheapest pass any
exporting or in-graph design could make, a session whose only outputs are ReduceMin and ReduceMax of each of
those tensors as a whole (padding not even excluded), built and run over every batch, against the calibrator
(its own session, batches padded to the longest sentence as ``quantize_static`` is fed) in the same process.

Prints a table and writes ``engines/bench/calibration_budget.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

OUT_PATH = Path("engines/bench/calibration_budget.json")
_KERNEL_LOAD = ("import json, time\nfrom calib import fused\nwall, cpu = time.perf_counter(), time.process_time()\n"
                "fused._exercise()\n"
                "print(json.dumps({'seconds': time.perf_counter() - wall, 'cpu_s': time.process_time() - cpu}))")


def _median(samples: Sequence[float]) -> float:
    return float(statistics.median(samples))


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _kernel_load(repeat: int) -> dict[str, float]:
    runs = []
    for _ in range(repeat):
        proc = subprocess.run([sys.executable, "-c", _KERNEL_LOAD], capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"seconds": _median([r["seconds"] for r in runs]), "cpu_s": _median([r["cpu_s"] for r in runs])}


def _session(model: bytes | str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as calib.collect's session
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _fold_cpu(session: Any, names: list[str], feeds: list[dict[str, np.ndarray]], layouts: dict[str, Any]) -> float:
    """Thread CPU seconds of folding every batch's tensors on this thread, each batch right after it ran."""
    from calib import fused
    from calib.collect import CollectOptions, _new_stats
    from calib.fold import observe
    from calib.outputs import run_unbound

    stats = _new_stats(tuple(names), layouts, True, CollectOptions())
    total = 0.0
    for index, feed in enumerate(feeds):
        outputs = run_unbound(session, names, feed)
        mask = np.asarray(feed["attention_mask"]).astype(bool)
        ids = np.asarray(feed["input_ids"])
        masks = fused.BatchMasks(mask)
        begin = time.thread_time()
        for name, value in zip(names, outputs, strict=True):
            observe(stats[name], layouts[name], value, mask, ids, batch=index, masks=masks)
        total += time.thread_time() - begin
    return total


def _in_graph(model: Any, names: list[str], feeds: list[dict[str, np.ndarray]], layouts: dict[str, Any],
              shapes: dict[str, tuple[int, ...]], whole: bool) -> tuple[Any, Callable[[dict[str, np.ndarray]],
                                                                               dict[str, np.ndarray]], int]:
    """A session reducing each feature-last tensor in the graph (valid rows gathered), the feed maker and the
    number of tensors reduced."""
    import onnx
    from onnx import TensorProto, helper

    from calib import fused

    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    batch, seq = feeds[0]["input_ids"].shape
    rows_inputs: dict[tuple[Any, ...], str] = {}
    outputs: list[str] = []
    for name in names:
        layout = layouts[name]
        if not (layout.flattened or (layout.token_axes and layout.has_dims)):
            continue
        pattern = tuple("B" if d == batch else "S" if d == seq else d for d in shapes[name])
        key = (pattern, layout)
        if key not in rows_inputs:
            rows_inputs[key] = f"__rows{len(rows_inputs)}"
            graph.graph.input.append(helper.make_tensor_value_info(rows_inputs[key], TensorProto.INT64, ["n"]))
        flat, kept = f"{name}__flat", f"{name}__kept"
        graph.graph.node.extend([helper.make_node("Flatten", [name], [flat], axis=len(shapes[name]) - 1),
                                 helper.make_node("Gather", [flat, rows_inputs[key]], [kept], axis=0)])
        axes = f"{name}__axes"  # opset 18 takes the axes as an input, earlier opsets as an attribute
        if not whole and opset >= 18:
            graph.graph.initializer.append(helper.make_tensor(axes, TensorProto.INT64, [1], [0]))
        for op in ("ReduceMin", "ReduceMax"):
            out = f"{name}__{op}"
            attrs: dict[str, Any] = {"keepdims": 0} | ({"axes": [0]} if not whole and opset < 18 else {})
            graph.graph.node.append(helper.make_node(op, [kept, axes] if not whole and opset >= 18 else [kept],
                                                     [out], **attrs))
            graph.graph.output.append(onnx.ValueInfoProto(name=out))
            outputs.append(out)

    def feed_of(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        masks = fused.BatchMasks(np.asarray(feed["attention_mask"]).astype(bool))
        b, s = feed["input_ids"].shape
        extra = {}
        for (pattern, layout), input_name in rows_inputs.items():
            shape = tuple(b if d == "B" else s if d == "S" else int(d) for d in pattern)
            extra[input_name] = np.flatnonzero(masks.get(layout, shape)[0][0]).astype(np.int64)
        return dict(feed) | extra

    return _session(graph.SerializeToString()), feed_of, len(outputs) // 2


def _whole_tensor_minmax(model: Any, names: list[str]) -> bytes:
    """The model with ReduceMin and ReduceMax of each of ``names`` (whole tensor, scalar) as its only outputs."""
    import onnx
    from onnx import helper

    graph = onnx.ModelProto()
    graph.CopyFrom(model)
    del graph.graph.output[:]
    for name in names:
        for op in ("ReduceMin", "ReduceMax"):
            graph.graph.node.append(helper.make_node(op, [name], [f"{name}__{op}"], keepdims=0))
            graph.graph.output.append(onnx.ValueInfoProto(name=f"{name}__{op}"))
    return graph.SerializeToString()


def minmax_bound(samples: int, repeat: int) -> dict[str, Any]:
    """The cheapest minmax pass over ``quantize_static``'s tensors against ONNX Runtime's MinMax calibrator."""
    from bench.calibration import _run_ort, _setup, matmul_tensors

    path, model, feeds = _setup(samples)
    names = matmul_tensors(model)
    reduced = _whole_tensor_minmax(model, names)
    def built_and_run(model_source: bytes | str) -> None:
        session = _session(model_source)
        for feed in feeds:
            session.run(None, feed)

    ours, theirs, floor = [], [], []
    for _ in range(repeat):
        floor.append(_timed(lambda: built_and_run(str(path)))[0])
        ours.append(_timed(lambda: built_and_run(reduced))[0])
        theirs.append(_run_ort("minmax", samples, 4)["seconds"])
    return {"tensors": len(names), "floor_s": _median(floor), "reduce_only_s": _median(ours),
            "ort_minmax_s": _median(theirs), "best_speedup": _median(theirs) / _median(ours)}


def measure(samples: int, repeat: int) -> dict[str, Any]:
    """Every part, ``repeat`` times, alternating (medians)."""
    import onnx

    from bench.calibration import _setup
    from builder.pipeline import analyze_model, calibration_tensors
    from calib import fused
    from calib.collect import CollectOptions, collect, instrument
    from calib.outputs import run_unbound

    path, model, feeds = _setup(samples)
    tensors = calibration_tensors(model, analyze_model(model))
    data = path.read_bytes()
    inputs = {i.name for i in model.graph.input}
    names = [n for n in tensors if n not in inputs]
    instrumented = instrument(model, data, tuple(tensors))
    export_session = _session(instrumented)
    layouts = dict(collect(path, feeds[:1], tensors, CollectOptions()).statistics.meta.layouts)
    shapes = {n: tuple(v.shape) for n, v in zip(names, run_unbound(export_session, names, feeds[0]), strict=True)}
    fused.warm_up()
    fused._warming[0].join()
    by_part: dict[str, list[tuple[float, float]]] = {}

    def record(part: str, fn: Callable[[], Any]) -> None:
        by_part.setdefault(part, []).append(_timed(fn))

    column_session, column_feed, reduced = _in_graph(model, names, feeds, layouts, shapes, whole=False)
    whole_session, whole_feed, _ = _in_graph(model, names, feeds, layouts, shapes, whole=True)
    fold_cpu = []
    for _ in range(repeat):
        record("floor session", lambda: _session(str(path)))
        plain = _session(str(path))
        record("floor batches", lambda: [plain.run(None, f) for f in feeds])  # noqa: B023 (called at once)
        record("read file", path.read_bytes)
        record("parse", lambda: onnx.load_from_string(data))
        record("sha256", lambda: hashlib.sha256(data).hexdigest())
        record("instrument", lambda: instrument(model, data, tuple(tensors)))
        record("instrumented session", lambda: _session(instrumented))
        record("export batches", lambda: [run_unbound(export_session, names, f) for f in feeds])
        record("collect", lambda: collect(path, feeds, tensors, CollectOptions()))
        record("in-graph per column", lambda: [column_session.run(None, column_feed(f)) for f in feeds])
        record("in-graph whole tensor", lambda: [whole_session.run(None, whole_feed(f)) for f in feeds])
        fold_cpu.append(_fold_cpu(export_session, names, feeds, layouts))
    parts = {part: {"seconds": _median([r[0] for r in runs]), "cpu_s": _median([r[1] for r in runs])}
             for part, runs in by_part.items()}
    parts["kernel load (child)"] = _kernel_load(repeat)
    parts["fold (one thread)"] = {"seconds": _median(fold_cpu), "cpu_s": _median(fold_cpu)}
    return {"samples": samples, "tensors": len(names), "reduced_in_graph": reduced, "parts": parts,
            "cores": len(os.sched_getaffinity(0))}


def bounds(report: dict[str, Any]) -> dict[str, float]:
    """The floor, the measured collection and the design's lower bounds, in seconds and as ratios."""
    p = {k: v["seconds"] for k, v in report["parts"].items()}
    cpu = {k: v["cpu_s"] for k, v in report["parts"].items()}
    floor = p["floor session"] + p["floor batches"]
    stream = max(p["export batches"], (cpu["export batches"] + cpu["fold (one thread)"]) / report["cores"])
    # the hash runs beside the parse, and the kernels load beside the session build (calib.collect)
    one_time = (p["read file"] + max(p["parse"], p["sha256"]) + p["instrument"]
                + max(p["instrumented session"], p["kernel load (child)"]))
    return {"floor_s": floor, "collect_s": p["collect"], "collect_ratio": p["collect"] / floor,
            "one_time_s": one_time, "stream_bound_s": stream,
            "bound_ratio": (p["instrumented session"] + stream) / floor,
            "bound_ratio_with_one_time": (one_time + stream) / floor}


def _print(report: dict[str, Any], limits: dict[str, float]) -> None:
    print(f"calibration budget: MiniLM, {report['samples']} VADER sentences, {report['tensors']} observed tensors, "
          f"{report['cores']} cores (medians)")
    print(f"{'part':<26} {'wall s':>8} {'CPU s':>8}")
    for part, value in report["parts"].items():
        print(f"{part:<26} {value['seconds']:>8.3f} {value['cpu_s']:>8.3f}")
    floor = limits["floor_s"]
    print(f"floor (session + batches): {floor:.3f} s")
    print(f"collect (kernels loaded): {limits['collect_s']:.3f} s = {limits['collect_ratio']:.2f}x the floor "
          f"(+ kernel load in a fresh process)")
    print(f"stream lower bound max(export, (export CPU + fold CPU) / cores): {limits['stream_bound_s']:.3f} s")
    print(f"design lower bound, instrumented session + stream: {limits['bound_ratio']:.2f}x the floor; "
          f"with today's one-time costs ({limits['one_time_s']:.3f} s): {limits['bound_ratio_with_one_time']:.2f}x")
    batches = report["parts"]["floor batches"]["seconds"]
    column, whole = (report["parts"][f"in-graph {k}"]["seconds"] / batches for k in ("per column", "whole tensor"))
    print(f"in-graph reductions of {report['reduced_in_graph']} feature-last tensors, no export: per column "
          f"{column:.2f}x, whole tensor {whole:.2f}x the floor's batches")
    bound = report["minmax_bound"]
    print(f"minmax on quantize_static's {bound['tensors']} tensors: a session with only whole-tensor ReduceMin/"
          f"ReduceMax outputs, built and run: {bound['reduce_only_s']:.3f} s "
          f"({bound['reduce_only_s'] / bound['floor_s']:.2f}x the floor); ONNX Runtime's MinMax calibrator "
          f"{bound['ort_minmax_s']:.3f} s: at most {bound['best_speedup']:.2f}x faster")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.calibration_budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    args = parser.parse_args(argv)
    report = measure(args.samples, args.repeat)
    report["minmax_bound"] = minmax_bound(args.samples, args.repeat)
    limits = bounds(report)
    _print(report, limits)
    from calib.artifact_io import atomic_write_json

    atomic_write_json(args.out, report | {"bounds": limits})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
