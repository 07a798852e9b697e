"""Accuracy benchmark (`make bench`): every preset and ONNX Runtime's quantize_static, measured in one run.

MiniLM is calibrated once on the 512 VADER calibration sentences (one collection pass, ranges decided with
every method), each preset is planned and lowered (portable variant), ONNX Runtime's quantizer gets the same
512 sentences, and every model is evaluated against FP32 on the disjoint probe train/test split and the Lee
rated pairs. Prints one table, writes engines/bench/accuracy.json and engines/bench/accuracy.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT_DIR = Path("engines/bench")
CALIBRATION_BATCH = 16
MAX_LENGTH = 128

logger = logging.getLogger("bench.accuracy")


@dataclass
class Setup:
    fp32: Any  # onnx.ModelProto
    report: Any  # GraphReport
    calibration_texts: list[str]
    tokenizer: Path


def _setup() -> Setup:
    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.intake.minilm import ensure_minilm_onnx, tokenizer_json_path
    from calib.data import vader_splits

    fp32 = load_model(ensure_minilm_onnx())
    texts = [s.text for s in vader_splits().calibration]
    return Setup(fp32=fp32, report=analyze(fp32, name="all-MiniLM-L6-v2"), calibration_texts=texts,
                 tokenizer=tokenizer_json_path())


def _feeds(setup: Setup) -> Any:
    from calib.tokenize import encode

    return encode(setup.calibration_texts, setup.tokenizer, MAX_LENGTH, CALIBRATION_BATCH)


def collect_calibration(setup: Setup) -> tuple[Any, float]:
    """One collection pass over the calibration sentences (every preset's ranges come from it); wall seconds."""
    from builder.graph.targets import calibration_tensors
    from calib.collect import CollectOptions, collect

    started = time.perf_counter()
    options = CollectOptions(data_source=f"vader:{len(setup.calibration_texts)}")
    collection = collect(setup.fp32, _feeds(setup), calibration_tensors(setup.fp32, setup.report), options)
    return collection, time.perf_counter() - started


def preset_tables(collection: Any, preset: str, data_source: str) -> list[Any]:
    """The RangeTables ``preset`` asks for (max first), decided from the shared collection."""
    from builder.plan.ranges import tables_for_recipe
    from builder.recipes.loader import load_preset
    from calib.calibrate import RangeSpec
    from calib.range_table import RangeMethod

    return tables_for_recipe(collection, load_preset(preset), RangeSpec(method=RangeMethod.MAX),
                             model_name="all-MiniLM-L6-v2", data_source=data_source)


def flagged_layers(setup: Setup, collection: Any) -> tuple[tuple[int, ...], list[dict[str, Any]]]:
    """The layers bondarenko-mp keeps in 16 bits, by the planner's rule (builder.plan.planner.flagged_layers:
    the FFN output or residual sum has max|x| >= MP_OUTLIER_RATIO x its 99.99th percentile), with the evidence."""
    from builder.plan.planner import MP_ROLES
    from builder.plan.planner import flagged_layers as planner_flagged
    from calib.outliers import outlier_report

    labels = {}
    for a in setup.report.assignments:
        for t in a.outputs:
            labels.setdefault(t, (a.layer, a.role.value))
    report = outlier_report(collection.stats, labels)
    evidence = [
        {"layer": r.layer, "role": r.role, "amax": r.amax, "range_share": r.range_share,
         "outlier_dims": list(r.outlier_dims[:4]), "max_over_p9999": r.max_over_p9999}
        for r in report.rows if r.role in MP_ROLES and r.layer is not None
    ]
    return planner_flagged(report) or (), evidence


def _timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def build_models(setup: Setup, collection: Any, flagged: tuple[int, ...], presets: list[str]) -> dict[str, Any]:
    """name -> (model or None, seconds, error or None) for every preset and ONNX Runtime baseline."""
    from builder.evaluate.ort_baseline import ORT_BASELINES, ort_quantize
    from builder.lower.quantize import quantize

    models: dict[str, Any] = {}
    for name in presets:
        try:
            tables = preset_tables(collection, name, f"vader:{len(setup.calibration_texts)}")
            lowered, seconds = _timed(
                lambda n=name, t=tables: quantize(setup.fp32, n, t, report=setup.report, outliers=flagged)
            )
            models[name] = (lowered.model, seconds, None)
        except Exception as exc:  # a benchmark row records any failure and the run goes on
            logger.exception("preset %s failed", name)
            models[name] = (None, 0.0, f"{type(exc).__name__}: {exc}")
    for name, config in ORT_BASELINES.items():
        quantized, seconds = _timed(lambda c=config: ort_quantize(setup.fp32, _feeds(setup), c, setup.report))
        models[name] = (quantized, seconds, None)
    return models


def layer_table_markdown(reports: list[Any], point: str = "block") -> str:
    """Per-layer relative error (residual stream after each block) with one column per model."""
    with_layers = [r for r in reports if r.layer_errors]
    if not with_layers:
        return ""
    layers = sorted({e.layer for r in with_layers for e in r.layer_errors})
    header = "| layer | " + " | ".join(r.model_name for r in with_layers) + " |"
    lines = [header, "|---:|" + "---:|" * len(with_layers)]
    for layer in layers:
        cells = []
        for r in with_layers:
            e = next((e for e in r.layer_errors if e.layer == layer and e.point == point), None)
            cells.append("-" if e is None or e.relative_error is None else f"{e.relative_error:.4f}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from builder.recipes.loader import preset_names

    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="*", default=preset_names(), help="presets to run (default: all)")
    parser.add_argument("--train-samples", type=int, help="first N probe train sentences (default all)")
    parser.add_argument("--test-samples", type=int, help="first N test sentences (default all)")
    parser.add_argument("--layer-sentences", type=int, default=256)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from builder.evaluate.evaluate import evaluate, load_eval_data, prepare_reference, reference_report
    from builder.evaluate.render import format_markdown, format_table, summary_row
    from calib.artifact_io import atomic_write_json, atomic_write_text

    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    setup = _setup()
    collection, calib_s = collect_calibration(setup)
    flagged, evidence = flagged_layers(setup, collection)
    logger.info("calibrated in %.1f s; flagged layers %s", calib_s, flagged)
    models = build_models(setup, collection, flagged, list(args.presets))
    data = load_eval_data(train_limit=args.train_samples, test_limit=args.test_samples,
                          layer_sentences=args.layer_sentences)
    reference, ref_s = _timed(lambda: prepare_reference(setup.fp32, data))
    reports = [reference_report(setup.fp32, data, reference, name="fp32")]
    rows: list[dict[str, Any]] = [{"name": "fp32", "eval_s": ref_s}]
    for name, (model, build_s, error) in models.items():
        if model is None:
            rows.append({"name": name, "error": error})
            continue
        report, eval_s = _timed(lambda m=model, n=name: evaluate(setup.fp32, m, setup.report, data, reference, n))
        reports.append(report)
        rows.append({"name": name, "build_s": build_s, "eval_s": eval_s})
    summary = [summary_row(r) for r in reports]
    failed = [(r["name"], r["error"]) for r in rows if "error" in r]
    title = (f"MiniLM (all-MiniLM-L6-v2) on ONNX Runtime CPU: calibration {len(setup.calibration_texts)} VADER "
             f"sentences; probe train {len(data.train_texts)}, test {len(data.test_texts)}; "
             f"{len(data.pairs)} Lee pairs; flagged layers {list(flagged)}")
    print(title)
    print(format_table(summary))
    for name, error in failed:
        print(f"{name}: failed: {error}")
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = (f"{title}\n\n{format_markdown(summary)}\n"
                + "".join(f"- {n}: failed: {e}\n" for n, e in failed)
                + "\nRelative error of the residual stream after each block (vs FP32):\n\n"
                + layer_table_markdown(reports))
    atomic_write_text(args.out / "accuracy.md", markdown)
    atomic_write_json(args.out / "accuracy.json", {
        "calibration_sentences": len(setup.calibration_texts), "calibration_s": calib_s,
        "flagged_layers": list(flagged), "flag_evidence": evidence, "timings": rows,
        "reports": [r.to_dict() for r in reports],
    })
    print(f"wrote {args.out / 'accuracy.json'} and {args.out / 'accuracy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
