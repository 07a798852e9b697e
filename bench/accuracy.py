"""Accuracy benchmark (`make bench`): every preset and ONNX Runtime's quantize_static, measured in one run.

MiniLM is calibrated once on the 512 VADER calibration sentences (one Statistics; every preset decides its
ranges from it), each preset goes through the library pipeline (builder.pipeline: plan, weights, portable
lowering), ONNX Runtime's quantizer gets the same
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
    from builder.pipeline import calibrate
    from calib.collect import CollectOptions

    started = time.perf_counter()
    options = CollectOptions(data_source=f"vader:{len(setup.calibration_texts)}")
    statistics = calibrate(setup.fp32, setup.report, _feeds(setup), options).statistics
    return statistics, time.perf_counter() - started


def flagged_layers(setup: Setup, statistics: Any) -> tuple[tuple[int, ...], list[dict[str, Any]]]:
    """The layers bondarenko-mp keeps in 16 bits, by the outlier report's rule (calib.outliers.OutlierReport.
    flagged_layers: the FFN output or residual sum has max|x| >= MP_OUTLIER_RATIO x its 99.99th percentile),
    with the evidence."""
    from builder.pipeline import outliers
    from calib.outliers import MP_ROLES

    report = outliers(setup.report, statistics)
    evidence = [
        {"layer": r.layer, "role": r.role, "amax": r.amax, "range_share": r.range_share,
         "outlier_dims": list(r.outlier_dims[:4]), "max_over_p9999": r.max_over_p9999}
        for r in report.rows if r.role in MP_ROLES and r.layer is not None
    ]
    return report.flagged_layers(), evidence


def _timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def build_models(setup: Setup, statistics: Any, flagged: tuple[int, ...], presets: list[str]) -> dict[str, Any]:
    """name -> (model or None, seconds, error or None) for every preset and ONNX Runtime baseline."""
    from builder.evaluate.ort_baseline import ORT_BASELINES, ort_quantize
    from builder.pipeline import quantize, resolve_recipe

    models: dict[str, Any] = {}
    for name in presets:
        try:
            recipe = resolve_recipe(name, setup.report)
            lowered, seconds = _timed(
                lambda r=recipe: quantize(setup.fp32, setup.report, r, statistics, flagged=flagged,
                                          feeds=_feeds(setup))
            )
            models[name] = (lowered.model.model, seconds, None)
        except Exception as exc:  # a benchmark row records any failure and the run goes on
            logger.exception("preset %s failed", name)
            models[name] = (None, 0.0, f"{type(exc).__name__}: {exc}")
    models.update(sparq_baselines(setup, statistics, presets))
    for name, config in ORT_BASELINES.items():
        quantized, seconds = _timed(lambda c=config: ort_quantize(setup.fp32, _feeds(setup), c, setup.report))
        models[name] = (quantized, seconds, None)
    return models


A4_BASELINE = "a4-p99"


def sparq_baselines(setup: Setup, statistics: Any, presets: list[str]) -> dict[str, Any]:
    """The plain 4-bit row SPARQ is measured against (when a sparq preset runs): sparq-b4's GEMM inputs, weights
    and precisions with per-tensor symmetric 4-bit activations (codes in [-7, 7], builder.quant.lowbit) at the
    99th percentile, the best range on 1,000 probe train sentences (mean cosine to FP32: max 0.361, p99.99 0.424,
    p99.9 0.610, p99.5 0.667, p99 0.673, p98 0.607, 4-bit MSE 0.671)."""
    from builder.pipeline import quantize
    from builder.quant.lowbit import LowBitConfig, lowbit_counterpart
    from builder.recipes.loader import load_preset

    if not any(name.startswith("sparq-") for name in presets):
        return {}
    config = LowBitConfig(bits=4, range="percentile", percentile=99.0)
    recipe = lowbit_counterpart(load_preset("sparq-b4"), config, A4_BASELINE)
    try:
        lowered, seconds = _timed(lambda: quantize(setup.fp32, setup.report, recipe, statistics))
    except Exception as exc:  # a benchmark row records any failure and the run goes on
        logger.exception("baseline %s failed", A4_BASELINE)
        return {A4_BASELINE: (None, 0.0, f"{type(exc).__name__}: {exc}")}
    return {A4_BASELINE: (lowered.model.model, seconds, None)}


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
    statistics, calib_s = collect_calibration(setup)
    flagged, evidence = flagged_layers(setup, statistics)
    logger.info("calibrated in %.1f s; flagged layers %s", calib_s, flagged)
    models = build_models(setup, statistics, flagged, list(args.presets))
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
