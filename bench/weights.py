"""Weight-quantizer benchmark (`make bench`): RTN, OPTQ and GPFQ, with and without AXE, against NVIDIA ModelOpt's
ONNX INT4 (rtn_dq, awq_clip, awq_lite), all measured in one run on MiniLM (all-MiniLM-L6-v2).

Calibration: the 512 VADER calibration sentences (batches of 16, up to 128 tokens), one Statistics pass plus one
Hessian pass (builder.pipeline.calibrate_weight_inputs) that every OPTQ row shares; GPFQ reads the quantized
model's inputs on the same batches. Rows (every weight GEMM; everything else as the ``int8-gemm`` preset):

    W8A8              int8-gemm activations (centered INT8), 8-bit weights per output channel
    W4A16 g128        weight-only: float activations, INT4 weights in blocks of 128 inputs (opset 21)
    W4A8              int8-gemm activations, 4-bit weights per output channel (INT8 codes in [-7, 7])
    W4A8 AXE P16 T128 the same, every tile of 128 inputs safe in a signed 16-bit accumulator

Each W4A8 graph goes through the overflow verifier (P = 16, T = 128). ModelOpt runs from ``.venv-modelopt``
(bench/modelopt_int4_driver.py, on a copy of the model: it rewrites its input) on the same batches, padded to one
length (its AWQ needs equal shapes and sees the padding tokens); its time is its own quantize call. Every model
is evaluated by builder.evaluate against FP32 (probe train / test split, Lee pairs). Writes
engines/bench/weights.json and engines/bench/weights.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT_DIR = Path("engines/bench")
MODELOPT_PYTHON = Path(".venv-modelopt/bin/python")
MODELOPT_DRIVER = Path(__file__).with_name("modelopt_int4_driver.py")
MODELOPT_METHODS = ("rtn_dq", "awq_clip", "awq_lite")
BATCH, MAX_LENGTH = 16, 128
AXE_BITS, AXE_TILE = 16, 128

logger = logging.getLogger("bench.weights")


@dataclass(frozen=True)
class Row:
    """One of our models: a setting (activations and weight storage) and a weight quantizer config."""

    setting: str
    method: str
    weight_only: bool
    options: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return f"{self.setting} {self.method}"

    @property
    def axe(self) -> bool:
        return any(k == "accumulator_bits" for k, _ in self.options)


def rows() -> list[Row]:
    axe = (("bits", 4), ("accumulator_bits", AXE_BITS), ("tile", AXE_TILE))
    out = [Row("W8A8", m, False, (("bits", 8),)) for m in ("rtn", "optq")]
    out += [Row("W4A16 g128", m, True, (("bits", 4), ("block", 128))) for m in ("rtn", "optq", "gpfq")]
    out += [Row("W4A8", m, False, (("bits", 4),)) for m in ("rtn", "optq", "gpfq")]
    out += [Row(f"W4A8 AXE P{AXE_BITS} T{AXE_TILE}", m, False, axe) for m in ("optq", "gpfq")]
    return out


def recipe_of(row: Row, report: Any) -> Any:
    """``int8-gemm`` with a last rule giving every weight GEMM the row's weight quantizer (and float inputs)."""
    from builder.pipeline import resolve_recipe
    from builder.quant.none import NoneConfig
    from builder.quant.registry import weight_config
    from builder.recipes.model import WEIGHT_GEMM_ROLES, Rule, Selector, Settings

    config = weight_config({"quantizer": row.method, **dict(row.options)}, row.name)
    rule = Rule(select=Selector(roles=tuple(sorted(WEIGHT_GEMM_ROLES, key=lambda r: r.value)), optional=True),
                set=Settings(weight=config, activation=NoneConfig() if row.weight_only else None), note=row.name)
    return resolve_recipe("int8-gemm", report).with_rules((rule,))


@dataclass
class Setup:
    fp32: Any
    report: Any
    feeds: list[dict[str, Any]]


def setup(samples: int | None) -> Setup:
    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.intake.minilm import ensure_minilm_onnx, tokenizer_json_path
    from calib.data import vader_splits
    from calib.tokenize import encode

    fp32 = load_model(ensure_minilm_onnx())
    texts = [s.text for s in vader_splits().calibration][:samples]
    feeds = [dict(f) for f in encode(texts, tokenizer_json_path(), MAX_LENGTH, BATCH)]
    return Setup(fp32=fp32, report=analyze(fp32, name="all-MiniLM-L6-v2"), feeds=feeds)


def _timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def build_ours(s: Setup, selected: list[Row]) -> tuple[dict[str, Any], dict[str, float]]:
    """name -> {model, seconds, verifier} for our rows; and the shared pass timings (calibration, Hessians)."""
    from builder.pipeline import calibrate, calibrate_weight_inputs, plan_model, quantize_planned
    from builder.verify.accumulator import AccumulatorSpec, verify_model
    from calib.collect import CollectOptions

    statistics, calib_s = _timed(lambda: calibrate(s.fp32, s.report, s.feeds, CollectOptions(
        data_source=f"vader:{sum(len(f['input_ids']) for f in s.feeds)}")).statistics)
    passes = {"calibration_s": calib_s, "hessian_s": 0.0}
    out: dict[str, Any] = {}
    for row in selected:
        try:
            plan = plan_model(s.fp32, s.report, recipe_of(row, s.report), statistics)
            if row.method == "optq" and not passes["hessian_s"]:
                statistics, passes["hessian_s"] = _timed(
                    lambda p=plan, st=statistics: calibrate_weight_inputs(s.fp32, p, st, s.feeds))
            result, seconds = _timed(lambda p=plan, st=statistics: quantize_planned(s.fp32, p, st, feeds=s.feeds))
        except Exception as exc:  # a benchmark row records any failure and the run goes on
            logger.exception("%s failed", row.name)
            out[row.name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        entry: dict[str, Any] = {"model": result.model.model, "weights_s": seconds}
        if row.setting.startswith("W4A8"):
            check = verify_model(result.model.model, AccumulatorSpec(accumulator_bits=AXE_BITS, tile=AXE_TILE))
            bad = [g for g in check.gemms if g.overflowing]
            entry["verifier"] = ("proved" if check.proved else
                                 f"{sum(g.overflowing for g in bad)} tile-channels in {len(bad)} of "
                                 f"{len(check.gemms)} GEMMs can overflow")
        out[row.name] = entry
        logger.info("%s: weights and lowering in %.1f s", row.name, seconds)
    return out, passes


def build_modelopt(s: Setup, methods: list[str], work: Path) -> dict[str, Any]:
    """name -> {model, seconds} for ModelOpt's INT4 methods (skipped with a reason when its venv is missing)."""
    import numpy as np
    import onnx

    if not MODELOPT_PYTHON.is_file():
        return {f"modelopt int4 {m}": {"error": f"skipped: {MODELOPT_PYTHON} missing (make bench creates it)"}
                for m in methods}
    source = work / "fp32.onnx"
    onnx.save(s.fp32, str(source))
    calib = work / "calib.npz"
    np.savez(calib, **{f"{i}|{k}": v for i, f in enumerate(padded(s.feeds)) for k, v in f.items()})
    out: dict[str, Any] = {}
    for method in methods:
        copy, result = work / f"{method}-input.onnx", work / f"{method}.onnx"
        shutil.copy(source, copy)  # ModelOpt rewrites the file it is given
        started = time.perf_counter()
        run = subprocess.run([str(MODELOPT_PYTHON), str(MODELOPT_DRIVER), "--model", str(copy), "--calib",
                              str(calib), "--method", method, "--out", str(result)],
                             capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        name = f"modelopt int4 {method}"
        if run.returncode != 0 or not result.is_file():
            out[name] = {"error": f"driver exit {run.returncode}: {run.stderr.strip()[-400:]}"}
            continue
        info = json.loads(run.stdout.strip().splitlines()[-1])
        out[name] = {"model": onnx.load(str(result)), "weights_s": float(info["seconds"]), "wall_s": wall,
                     "peak_rss_mib": info.get("peak_rss_mib"), "version": info.get("modelopt")}
        logger.info("%s: %.1f s (driver wall %.1f s)", name, info["seconds"], wall)
    return out


def padded(feeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batches padded (id 0, mask 0) to one sequence length: ModelOpt's AWQ concatenates the activations of
    all batches along the token axis and needs equal shapes (it has no notion of a padding mask)."""
    import numpy as np

    length = max(int(f["input_ids"].shape[1]) for f in feeds)
    return [{k: np.pad(v, ((0, 0), (0, length - v.shape[1]))) for k, v in f.items()} for f in feeds]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", help="our rows to run, by name (default: all)")
    parser.add_argument("--modelopt", nargs="*", default=list(MODELOPT_METHODS), choices=MODELOPT_METHODS,
                        help="ModelOpt INT4 methods (default: all three; none: skip ModelOpt)")
    parser.add_argument("--samples", type=int, help="calibration sentences (default: all 512)")
    parser.add_argument("--train-samples", type=int, help="first N probe train sentences (default all)")
    parser.add_argument("--test-samples", type=int, help="first N test sentences (default all)")
    parser.add_argument("--layer-sentences", type=int, default=64)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    return parser.parse_args(argv)


def _markdown(title: str, table: list[tuple[str, ...]], header: tuple[str, ...], notes: list[str]) -> str:
    lines = [title, "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join([*lines, "", *notes]) + "\n"


HEADER = ("model", "probe acc (FP32 probe)", "probe acc (refit)", "cosine mean", "cosine min", "Spearman",
          "quantize s", "verifier P16 T128")


def main(argv: list[str] | None = None) -> int:
    from builder.evaluate.evaluate import evaluate, load_eval_data, prepare_reference
    from builder.evaluate.render import summary_row
    from calib.artifact_io import atomic_write_json, atomic_write_text

    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    s = setup(args.samples)
    selected = [r for r in rows() if not args.rows or r.name in args.rows]
    ours, passes = build_ours(s, selected)
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as work:
        models = {**ours, **build_modelopt(s, list(args.modelopt), Path(work))}
    data = load_eval_data(train_limit=args.train_samples, test_limit=args.test_samples,
                          layer_sentences=args.layer_sentences)
    reference = prepare_reference(s.fp32, data)
    table, records = [], []
    for name, entry in models.items():
        if "model" not in entry:
            table.append((name, *["-"] * 6, entry["error"]))
            records.append({"name": name, "error": entry["error"]})
            continue
        report = evaluate(s.fp32, entry.pop("model"), s.report, data, reference, name)
        table.append((*summary_row(report)[:6], f"{entry['weights_s']:.1f}", entry.get("verifier", "-")))
        records.append({"name": name, **entry, "report": report.to_dict()})
    notes = [f"- calibration pass {passes['calibration_s']:.1f} s and Hessian pass {passes['hessian_s']:.1f} s "
             "(shared by every optq row) come on top of our quantize seconds; ModelOpt's seconds are its whole "
             "quantize call (its own calibration included)."]
    title = (f"MiniLM weight quantizers on ONNX Runtime CPU: calibration {sum(len(f['input_ids']) for f in s.feeds)} "
             f"VADER sentences; probe train {len(data.train_texts)}, test {len(data.test_texts)}")
    markdown = _markdown(title, table, HEADER, notes)
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "weights.md", markdown)
    atomic_write_json(args.out / "weights.json", {"passes": passes, "rows": records})
    print(f"wrote {args.out / 'weights.json'} and {args.out / 'weights.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
