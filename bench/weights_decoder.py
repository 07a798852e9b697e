"""Weight-quantizer benchmark on a decoder (`python -m bench.weights_decoder`): SmolLM2-135M-Instruct W4A16.

Every linear layer of every block (Q/K/V, attention output, gate/up, down; the tied LM head stays float, as
ModelOpt's INT4 default keeps it) reads INT4 weights in blocks of 32 inputs (SmolLM2's hidden width 576 is not a
multiple of 128) with float activations; RTN and OPTQ, OPTQ from the Hessians of a second pass over the same
calibration batches (128 passages x 256 tokens of the calibration slice of ``shakespeare``). OPTQ's
first-token weight is chosen among ``--select-first-token-weight`` (1, 4, 16, 64, 256) by perplexity on 64
held-out calibration-side passages (bench.decoder.heldout_perplexity; one Hessian pass serves every weight).
ModelOpt's INT4 rtn_dq with the same block runs beside it (``.venv-modelopt``). Perplexity on the evaluation
slice (builder.evaluate, 8 windows x 512 tokens). Writes engines/bench/weights_decoder.json and .md.

``--block``, ``--[no-]act-order``, ``--scale`` and ``--first-token-weight`` set the INT4 block and the
quantizers' options for every row (act-order and the first-token weight do not apply to RTN; OPTQ's defaults
are act-order and, without AXE, MSE scales weighed by the Hessian diagonal).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT_DIR = Path("engines/bench")
SOURCE, CALIB_SAMPLES, MAX_LENGTH, BATCH = "shakespeare", 128, 256, 4
WINDOW, WINDOWS = 512, 8
BLOCK = 32
SELECT = (1.0, 4.0, 16.0, 64.0, 256.0)  # first-token weights tried on held-out passages
HELDOUT = 64  # passages after the calibration ones (bench.decoder.heldout_perplexity: 6 windows x 256)
# options that only some quantizers take (the rest apply to every row)
OPTION_METHODS = {"act_order": ("optq", "gpfq"), "first_token_weight": ("optq",)}
HEADER = ("model", "perplexity", "vs FP32", "top-1 agree", "KL", "quantize s")

logger = logging.getLogger("bench.weights_decoder")


def _recipe(method: str, options: dict[str, Any] | None = None) -> Any:
    from builder.quant.none import NoneConfig
    from builder.quant.registry import weight_config
    from builder.recipes.model import WEIGHT_GEMM_ROLES, Precision, Recipe, Rule, Selector, Settings

    roles = tuple(sorted((r for r in WEIGHT_GEMM_ROLES if r.value != "lm_head"), key=lambda r: r.value))
    config = weight_config({"quantizer": method, "bits": 4, "block": BLOCK, **(options or {})}, method)
    return Recipe(name=f"w4a16-{method}", rules=(Rule(select=Selector(roles=roles, optional=True), set=Settings(
        precision=Precision.INT8, activation=NoneConfig(), weight=config)),))


def _quantized(setup: Any, statistics: Any, feeds: list[dict[str, Any]], method: str,
               options: dict[str, Any]) -> tuple[Any, float]:
    """The W4A16 model of ``method`` with ``options`` (planned and quantized) and the seconds it took."""
    from builder.pipeline import plan_model, quantize_planned

    started = time.perf_counter()
    plan = plan_model(setup.fp32, setup.report, _recipe(method, options), statistics)
    return quantize_planned(setup.fp32, plan, statistics, feeds=feeds).model.model, time.perf_counter() - started


def build(setup: Any, feeds: list[dict[str, Any]], methods: list[str], options: dict[str, Any] | None = None,
          select: list[float] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """name -> (model or None, seconds, error) for our rows; the shared pass timings (and, with ``select``, the
    first-token weights OPTQ tried on held-out calibration-side passages, best first)."""
    from bench.decoder import calibrate, heldout_perplexity
    from builder.pipeline import calibrate_weight_inputs, plan_model

    started = time.perf_counter()
    statistics = calibrate(setup, feeds)
    passes: dict[str, Any] = {"calibration_s": time.perf_counter() - started, "hessian_s": 0.0}
    out: dict[str, Any] = {}
    for method in methods:
        started = time.perf_counter()
        own = {k: v for k, v in (options or {}).items() if method in OPTION_METHODS.get(k, (method,))}
        if method == "optq":
            plan = plan_model(setup.fp32, setup.report, _recipe(method, own), statistics)
            statistics = calibrate_weight_inputs(setup.fp32, plan, statistics, feeds)
            passes["hessian_s"] = time.perf_counter() - started
        if method == "optq" and select:
            heldout, tried, best = heldout_perplexity(setup), [], None
            for weight in select:  # the Hessians keep the first-token rows: one pass serves every weight
                model, seconds = _quantized(setup, statistics, feeds, method, {**own, "first_token_weight": weight})
                tried.append({"first_token_weight": weight, "heldout_perplexity": heldout(model)})
                logger.info("first-token weight %g: held-out perplexity %.3f", weight, tried[-1]["heldout_perplexity"])
                if best is None or tried[-1]["heldout_perplexity"] < best[0]["heldout_perplexity"]:
                    best = (tried[-1], model, seconds)  # only the best model is kept: not quantized again
            assert best is not None
            passes["first_token_selection"] = sorted(tried, key=lambda t: t["heldout_perplexity"])
            own = {**own, "first_token_weight": best[0]["first_token_weight"]}
            model, seconds = best[1], best[2]
        else:
            model, seconds = _quantized(setup, statistics, feeds, method, own)
        label = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in own.items()
                         if k != "block" and (k, v) != ("scale", "max"))
        block = (options or {}).get("block", BLOCK)
        out[f"W4A16 g{block} {method}{' ' + label if label else ''}"] = (model, seconds, "")
        logger.info("%s done in %.1f s", method, seconds)
    return out, passes


def modelopt_rtn(setup: Any, feeds: list[dict[str, Any]], work: Path, block: int = BLOCK) -> tuple[Any, float, str]:
    import json
    import shutil
    import subprocess

    import numpy as np
    import onnx

    from bench.weights import MODELOPT_DRIVER, MODELOPT_PYTHON

    if not MODELOPT_PYTHON.is_file():
        return None, 0.0, f"skipped: {MODELOPT_PYTHON} missing"
    copy = work / "model.onnx"
    shutil.copy(setup.path, copy)  # ModelOpt rewrites the file it is given
    np.savez(work / "calib.npz", **{f"{i}|{k}": v for i, f in enumerate(feeds) for k, v in f.items()})
    run = subprocess.run([str(MODELOPT_PYTHON), str(MODELOPT_DRIVER), "--model", str(copy), "--calib",
                          str(work / "calib.npz"), "--method", "rtn_dq", "--block", str(block), "--out",
                          str(work / "out.onnx")], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        return None, 0.0, f"driver exit {run.returncode}: {run.stderr.strip()[-300:]}"
    info = json.loads(run.stdout.strip().splitlines()[-1])
    return onnx.load(str(work / "out.onnx")), float(info["seconds"]), ""


def main(argv: list[str] | None = None) -> int:
    from bench.decoder import Setup, calibration_feeds
    from builder.evaluate.evaluate import evaluate, load_eval_data, prepare_reference, reference_report
    from builder.evaluate.render import language_row
    from builder.evaluate.tokenizer import model_text_encoder
    from builder.graph.load import load_model
    from builder.intake.decoder import ensure_smollm2_onnx
    from builder.pipeline import analyze_model
    from calib.artifact_io import atomic_write_json, atomic_write_text
    from calib.data import calibration_texts

    parser = argparse.ArgumentParser(prog="python -m bench.weights_decoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=["rtn", "optq"], choices=("rtn", "optq", "gpfq"))
    parser.add_argument("--no-modelopt", action="store_true")
    parser.add_argument("--samples", type=int, default=CALIB_SAMPLES, help=f"calibration passages ({CALIB_SAMPLES})")
    parser.add_argument("--block", type=int, default=BLOCK, help=f"inputs per INT4 scale block ({BLOCK})")
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction,
                        help="optq/gpfq: inputs by descending Hessian diagonal (default: the quantizer's)")
    parser.add_argument("--scale", choices=("max", "mse"), help="weight scales (default: the quantizer's)")
    parser.add_argument("--select-first-token-weight", type=lambda v: [float(x) for x in v.split(",") if x],
                        default=list(SELECT), metavar="W,W,...",
                        help="optq: try these first-token weights and keep the one with the lowest perplexity on "
                             "held-out calibration-side passages, never the evaluation slice (default "
                             f"{','.join(f'{w:g}' for w in SELECT)}; empty or with --first-token-weight: no choice)")
    parser.add_argument("--first-token-weight", type=float,
                        help="optq: each calibration text's first token counted this many times in the Hessian "
                             "(default: the quantizer's)")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH,
                        help=f"tokens per calibration passage ({MAX_LENGTH})")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    if args.max_length < 2:
        parser.error(f"--max-length {args.max_length} must be at least 2 (a token and the one it predicts)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = ensure_smollm2_onnx()
    fp32 = load_model(path)
    setup = Setup(path=path, fp32=fp32, report=analyze_model(fp32, "SmolLM2-135M-Instruct"),
                  encoder=model_text_encoder(path), texts=calibration_texts(SOURCE, args.samples))
    feeds = calibration_feeds(setup, max_length=args.max_length)
    options = {"block": args.block, **({"scale": args.scale} if args.scale else {}),
               **({"act_order": args.act_order} if args.act_order is not None else {}),
               **({"first_token_weight": args.first_token_weight} if args.first_token_weight is not None else {})}
    select = None if args.first_token_weight is not None else args.select_first_token_weight
    models, passes = build(setup, feeds, list(args.methods), options, select)
    if not args.no_modelopt:
        with tempfile.TemporaryDirectory(prefix="bench-weights-decoder-") as work:
            models[f"modelopt int4 rtn_dq g{args.block}"] = modelopt_rtn(setup, feeds, Path(work), args.block)
    data = load_eval_data(train_limit=16, test_limit=16, layer_sentences=4, text_source=SOURCE, window=WINDOW,
                          windows=WINDOWS)
    reference = prepare_reference(setup.fp32, data, encoder=setup.encoder)
    table = [(*language_row(reference_report(setup.fp32, data, reference, name="fp32"))[:5], "-")]
    records: list[dict[str, Any]] = []
    for name, (model, seconds, error) in models.items():
        if model is None:
            table.append((name, "-", "-", "-", "-", error))
            continue
        report = evaluate(setup.fp32, model, setup.report, data, reference, name)
        table.append((*language_row(report)[:5], f"{seconds:.1f}"))
        records.append({"name": name, "seconds": seconds, "report": report.to_dict()})
    lines = ["| " + " | ".join(HEADER) + " |", "|---|" + "---:|" * (len(HEADER) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    markdown = (f"SmolLM2-135M-Instruct W4A16 (INT4 blocks of {args.block}), perplexity on {WINDOWS} x {WINDOW} "
                f"tokens; calibration {len(setup.texts)} passages x {args.max_length} tokens "
                f"({passes['calibration_s']:.1f} s), "
                f"Hessian pass {passes['hessian_s']:.1f} s\n\n" + "\n".join(lines) + "\n")
    if passes.get("first_token_selection"):
        tried = ", ".join(f"{t['first_token_weight']:g}: {t['heldout_perplexity']:.3f}"
                          for t in sorted(passes["first_token_selection"], key=lambda t: t["first_token_weight"]))
        markdown += (f"\nOPTQ's first-token weight, chosen by perplexity on {HELDOUT} held-out calibration-side "
                     f"passages (never the evaluation slice): {tried}\n")
    print(markdown)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "weights_decoder.md", markdown)
    atomic_write_json(args.out / "weights_decoder.json", {"passes": passes, "rows": records})
    return 0


if __name__ == "__main__":
    sys.exit(main())
