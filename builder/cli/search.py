"""CLI stage: ``build-engine search`` -- the most INT8 that meets an accuracy budget (builder.search at the edge)."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from builder.cli.steps import CalibSettings
    from builder.search.budget import Budget
    from builder.search.scoring import SearchSlice

HELP = """\
Search which layers to keep in FP16/BF16 so that the model meets an accuracy budget with the most INT8.

Starting from a recipe (default hero-m3, the most INT8), the search measures each unit's damage with only that
unit in INT8, orders the units by damage per INT8 multiply-accumulate, bisects for the longest prefix that
meets the budget, then greedily moves more GEMMs to INT8 and tidies the LayerNorm/softmax outputs (which
carry no GEMM work) back to INT8 where the budget allows. Units are (layer, role) pairs by default.

The budget names a metric the model's evaluation computes:
  sentence encoders       cosine>=0.999   cosine-min>=0.99   probe-drop<=0.1 (percentage points)
  causal language models  perplexity<=+2% (or +0.5, or an absolute value)   top1>=0.98
It is measured on held-out calibration-side data, never the test split: VADER probe-train sentences that are
not calibration sentences (encoders), or calibration-side corpus passages calibration did not use (decoders).
Calibration runs once (statistics.npz in the output folder, reused and resumable; hessians.npz too when the
base recipe's weights are OPTQ's); every candidate is planned from it, and quantizes only the weights whose
GEMM or input quantization no earlier candidate had. Candidates run as a chain of blocks cut at the residual
stream, and only the blocks after the longest prefix already computed run again. Every measured candidate is
appended to journal.jsonl: a re-run with the same inputs continues from it (--fresh starts over; a new budget
reuses the measurements).

Writes into the output folder: recipe.yaml (the base recipe plus fallback rules; `quantize --recipe` reads it),
model.onnx, plan.json, precision.json (the answer, lowered), candidates.json and candidates.md (every candidate:
INT8 share, metrics, time), pareto.png (INT8 share against the metric, the presets marked), search.json (the
answer, sensitivities, timings, machine load) and test-report.json (the answer on the test split, apart).
"""

EPILOG = """\
budgets (METRIC>=VALUE when higher is better, METRIC<=VALUE when lower is better):
  'cosine>=0.999'       mean cosine of the sentence embeddings to FP32 on the held-out slice at least 0.999
  'cosine-min>=0.99'    no held-out sentence below 0.99
  'probe-drop<=0.1'     at most 0.1 percentage points of probe accuracy lost against FP32
  'perplexity<=+2%'     held-out perplexity at most 2% above FP32's; '<=+0.5' adds 0.5; '<=12.5' is absolute
  'top1>=0.98'          the next token agrees with FP32's at 98% of positions (also '>=98%')

examples:
  build-engine search model.onnx --recipe hero-m3 --budget 'cosine>=0.999' -o engines/minilm-search
  build-engine quantize model.onnx --statistics engines/minilm-search \\
      --recipe engines/minilm-search/recipe.yaml -o engines/minilm-found      # the answer, again
  build-engine search model.onnx --budget 'probe-drop<=0.1' --slice 1000 --time-limit 600
  build-engine search smollm2.onnx --recipe int8-all-linear --budget 'perplexity<=+2%' --calib-data shakespeare \\
      --samples 64 --max-length 256 --granularity layer -o engines/smollm2-search
  build-engine search model.onnx --budget 'cosine>=0.9995' --granularity layer --max-evals 40 --presets none
      (run it again without --max-evals: the journal supplies the 40 and the search goes on)

The search is deterministic: the same model, data, --seed and flags give the same candidates and recipe.

exit codes: 0 budget met, 2 bad flag, budget or recipe, 3 budget not met (the closest point is written and
the message says how far it is), or unreadable model or data, 4 lowering failed
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from builder.cli.common import add_calib_data_arguments

    parser.add_argument("model", type=Path, help="ONNX model file (FP32, as exported)")
    parser.add_argument("--budget", required=True, metavar="METRIC OP VALUE",
                        help="e.g. 'cosine>=0.999', 'probe-drop<=0.1', 'perplexity<=+2%%', 'top1>=0.98'")
    parser.add_argument("--recipe", default="hero-m3", help="base recipe: preset or YAML (default hero-m3)")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default engines/<model>-search)")
    search = parser.add_argument_group("search")
    search.add_argument("--granularity", default="layer-role", choices=("layer-role", "layer", "node"),
                        help="what falls back together (default layer-role: one role in one block)")
    search.add_argument("--fallback-precision", default="fp16", choices=("fp16", "bf16"),
                        help="type of the islands (default fp16; bf16 cannot run on ONNX Runtime's CPU provider)")
    search.add_argument("--max-evals", type=int, metavar="N", help="new candidate evaluations at most (this run)")
    search.add_argument("--time-limit", type=float, metavar="SECONDS", help="stop the search after this long")
    search.add_argument("--no-refine", action="store_true", help="stop after the bisection")
    search.add_argument("--no-tidy", action="store_true", help="leave LayerNorm/softmax outputs in 16 bits")
    search.add_argument("--presets", default="all", metavar="NAMES",
                        help="presets to measure on the slice for the plot: all (default), none, or a,b,c")
    search.add_argument("--cache-mib", type=int, default=1024, metavar="MIB",
                        help="memory for cached block outputs (default 1024; 0 runs every candidate whole)")
    search.add_argument("--fresh", action="store_true", help="ignore journal.jsonl and statistics.npz")
    data = parser.add_argument_group("search slice (held-out calibration-side data)")
    data.add_argument("--slice", type=int, default=512, metavar="N", help="sentences (encoders; default 512)")
    data.add_argument("--quick", type=int, default=128, metavar="N",
                      help="sentences or windows of the sensitivity step (default 128; windows: half the slice)")
    data.add_argument("--text", metavar="SOURCE",
                      help="decoders: corpus of the held-out windows and of the test windows (shakespeare, lee or a "
                           "file; default: --calib-data when it is one of those, else shakespeare)")
    data.add_argument("--window", type=int, default=256, metavar="TOKENS", help="decoders: tokens per window")
    data.add_argument("--windows", type=int, default=8, metavar="N", help="decoders: windows in the slice")
    test = parser.add_argument_group("test split (the answer only, reported apart)")
    test.add_argument("--test-samples", type=int, metavar="N", help="first N test sentences (default all)")
    test.add_argument("--test-windows", type=int, default=8, metavar="N", help="decoders: test windows (8)")
    test.add_argument("--no-test", action="store_true", help="skip the test-split evaluation")
    add_calib_data_arguments(parser.add_argument_group("calibration data"))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _check_flags(args: argparse.Namespace) -> None:
    from builder.search.budget import BUDGET_RE, METRICS
    from calib.errors import ConfigError, suggest

    for flag in ("max_evals", "slice", "quick", "window", "windows", "test_samples", "test_windows"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be a positive count, got {value}")
    if args.time_limit is not None and args.time_limit <= 0:
        raise ConfigError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    if args.cache_mib < 0:
        raise ConfigError(f"--cache-mib must be 0 or more, got {args.cache_mib}")
    match = BUDGET_RE.match(args.budget)  # the metric is checked against the model once it is read
    if match is None or match.group(1) not in METRICS:
        name = match.group(1) if match else args.budget
        raise ConfigError(f"--budget {args.budget!r}: expected METRIC>=VALUE or METRIC<=VALUE with a metric among "
                          f"{', '.join(METRICS)}{suggest(name, list(METRICS))}")
    if not args.model.is_file():
        raise ConfigError(f"model file {str(args.model)!r} does not exist")


def run(args: argparse.Namespace) -> int:
    from builder.cli.lock import claim_output_dir

    _check_flags(args)
    folder: Path = args.output or Path("engines") / f"{args.model.stem}-search"
    with claim_output_dir(folder, "search", parents=args.output is None):  # checked and locked before any work
        return _search(args, folder)


def _slice(args: argparse.Namespace, settings: CalibSettings, encoder: Any, kind: Any) -> SearchSlice:
    from builder.search.budget import ModelKind
    from builder.search.scoring import language_slice, sentence_slice
    from calib.data import calibration_texts

    calibration = calibration_texts(settings.data, settings.samples, settings.seed)
    if kind == ModelKind.LANGUAGE:
        return language_slice(_text(args), calibration, encoder, args.window, args.windows)
    return sentence_slice(calibration, args.slice, seed=settings.seed)


def _presets(spec: str, report: Any) -> tuple[list[Any], dict[str, str]]:
    from builder.pipeline import resolve_recipe
    from builder.recipes.loader import preset_names
    from calib.errors import ConfigError, ToolkitError

    if spec == "none":
        return [], {}
    names = preset_names() if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in preset_names()]
    if unknown:
        raise ConfigError(f"--presets: unknown preset {unknown[0]!r}; presets: {', '.join(preset_names())}")
    recipes, skipped = [], {}
    for name in names:
        try:
            recipes.append(resolve_recipe(name, report))
        except ToolkitError as exc:  # a preset written for another kind of model
            skipped[name] = str(exc)
    return recipes, skipped


def _calibrate(prepared: Any, report: Any, settings: CalibSettings, folder: Path, encoder: Any,
               args: argparse.Namespace) -> Any:
    """The one Statistics of the search (statistics.npz in ``folder``: reused when complete, else resumed)."""
    from builder.cli.steps import collect_statistics
    from builder.pipeline import calibration_tensors

    tensors = calibration_tensors(prepared.model, report)
    source = prepared.model if prepared.rewritten else prepared.path
    result = collect_statistics(source, tensors, settings, folder, encoder, fresh=args.fresh,
                                progress=not args.no_progress)
    state = "reused" if result.resumed_batches == result.statistics.batches else "calibrated"
    print(f"calibration: {state}, {len(tensors)} tensors on {result.statistics.samples} texts ({settings.data})",
          flush=True)
    return result.statistics


def _weight_inputs(prepared: Any, report: Any, base: Any, statistics: Any, settings: CalibSettings, folder: Path,
                   encoder: Any, args: argparse.Namespace) -> Any:
    """``statistics`` with what the base recipe reads beyond calibration's default observers (OPTQ's Hessians into
    hessians.npz, vSPARQ's zero pairs), collected once on the calibration feeds: a superset of every candidate's."""
    from builder.cli.steps import HESSIAN_FILE, calibration_feeds, weight_statistics
    from builder.pipeline import plan_and_statistics
    from builder.weights.hessians import missing

    source = prepared.model if prepared.rewritten else prepared.path
    feeds = functools.cache(lambda: calibration_feeds(settings, encoder))  # read only when something is missing
    base_plan, statistics = plan_and_statistics(prepared.model, report, base, statistics, feeds=feeds, source=source)
    lacking = missing(base_plan, statistics)
    if not lacking:
        return statistics
    if args.fresh:
        (folder / HESSIAN_FILE).unlink(missing_ok=True)
    statistics = weight_statistics(source, base_plan, statistics, feeds(), folder, data_source=settings.source,
                                   progress=not args.no_progress)
    kinds = ", ".join(sorted({k for v in lacking.values() for k in v}))
    print(f"weight statistics: {kinds} of {len(lacking)} GEMM inputs ({folder / 'hessians.npz'})", flush=True)
    return statistics


def _scorers(model: Any, encoder: Any, data: SearchSlice, budget: Budget, args: argparse.Namespace,
             folder: Path) -> tuple[Any, Any]:
    """The full and quick slices with their FP32 references (cached under ``folder/eval-cache``)."""
    from builder.evaluate.progress import Progress
    from builder.search.scoring import prepare_scorer
    from calib.artifact_io import sha256_file

    sha = sha256_file(args.model)
    cache = folder / "eval-cache"
    quick_count = min(args.quick, max(1, data.samples // 2) if data.windows is not None else data.samples)
    bar = None if args.no_progress else _phase_bar()
    with (bar or Progress()).phase("FP32 reference on the search slice", total=None):
        full = prepare_scorer(model, encoder, data, with_probe=budget.metric.name == "probe-drop",
                              batch_size=args.batch_size, max_length=args.max_length, cache_dir=cache,
                              model_sha256=sha)
        quick = prepare_scorer(model, encoder, data.head(quick_count), batch_size=args.batch_size,
                               max_length=args.max_length, cache_dir=cache, model_sha256=sha)
    return full, quick


def _phase_bar() -> Any:
    from builder.cli.evaluate import BarProgress

    return BarProgress()


def _inputs_key(args: argparse.Namespace, statistics: Any, base: Any, data: SearchSlice, quick: Any) -> str:
    """What the journal's measurements depend on (the budget is not among them)."""
    from builder.cli.steps import stage_key
    from builder.plan.planner import statistics_digest
    from builder.recipes.loader import recipe_to_yaml
    from calib.artifact_io import sha256_file

    windows = None if data.windows is None else data.windows.ids.tolist()
    return stage_key(model=sha256_file(args.model), statistics=statistics_digest(statistics),
                     recipe=recipe_to_yaml(base), granularity=args.granularity, precision=args.fallback_precision,
                     texts=stage_key(texts=list(data.texts), windows=windows), quick=quick.data.samples,
                     batch=args.batch_size, length=args.max_length)


def _request(args: argparse.Namespace, base: Any, budget: Budget, presets: list[Any], settings: CalibSettings,
             encoder: Any) -> Any:
    from builder.cli.steps import calibration_feeds
    from builder.recipes.model import Precision
    from builder.search.driver import SearchRequest
    from builder.search.search import SearchOptions
    from builder.search.units import Granularity

    if args.fallback_precision == "bf16":
        from calib.errors import BackendUnavailable

        raise BackendUnavailable("--fallback-precision bf16: candidates are measured on ONNX Runtime's CPU "
                                 "provider, which has no BF16 kernels for these ops; search with fp16 (the same "
                                 "islands) and edit the recipe's fallback rules to bf16")
    uses_correction = base.uses_bias_correction or any(p.uses_bias_correction for p in presets)
    return SearchRequest(
        base=base, budget=budget, precision=Precision(args.fallback_precision),
        granularity=Granularity(args.granularity), presets=tuple(presets), cache_bytes=args.cache_mib << 20,
        options=SearchOptions(max_evals=args.max_evals, time_limit_s=args.time_limit, refine=not args.no_refine,
                              tidy=not args.no_tidy),
        feeds=calibration_feeds(settings, encoder) if uses_correction else None)


@contextmanager
def _progress_bar(args: argparse.Namespace, metric: str) -> Iterator[Callable[[Any], None]]:
    """A tqdm bar over evaluated candidates, its postfix the best INT8 share meeting the budget so far."""
    from tqdm import tqdm

    bar = tqdm(total=args.max_evals, unit="candidate", desc="search", disable=args.no_progress, dynamic_ncols=True)

    def step(point: Any) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{point.phase} {point.share:.0%} {metric} {point.value(metric):.5g}", refresh=False)

    try:
        yield step
    finally:
        bar.close()


def _text(args: argparse.Namespace) -> str:
    """The corpus of a decoder's held-out and test windows: --text, else the calibration corpus."""
    return str(args.text or ("shakespeare" if args.calib_data in ("auto", "vader") else args.calib_data))


def _search(args: argparse.Namespace, folder: Path) -> int:
    import os
    import time

    from builder.cli.common import calib_settings
    from builder.intake.prepare import prepare_model
    from builder.pipeline import analyze_model, resolve_recipe
    from builder.search.budget import parse_budget
    from builder.search.driver import precision_search
    from builder.search.journal import JOURNAL_FILE, Journal, read_journal
    from builder.search.scoring import model_kind

    started = time.perf_counter()
    prepared = prepare_model(args.model)
    model = prepared.model
    report = analyze_model(model, args.model.stem)
    base = resolve_recipe(args.recipe, report)  # a bad recipe fails before calibration
    settings = calib_settings(args)
    encoder = settings.encoder(args.model)
    kind = model_kind(model, encoder)
    budget = parse_budget(args.budget, kind)
    presets, skipped = _presets(args.presets, report)
    request = _request(args, base, budget, presets, settings, encoder)
    statistics = _calibrate(prepared, report, settings, folder, encoder, args)
    statistics = _weight_inputs(prepared, report, base, statistics, settings, folder, encoder, args)
    data = _slice(args, settings, encoder, kind)
    full, quick = _scorers(model, encoder, data, budget, args, folder)
    inputs = _inputs_key(args, statistics, base, data, quick)
    load_start = os.getloadavg()
    prepare_s = time.perf_counter() - started
    known = {} if args.fresh else read_journal(folder / JOURNAL_FILE, inputs)
    if known:
        print(f"resuming: {len(known)} candidates recorded in {folder / JOURNAL_FILE}", flush=True)
    journal = Journal(folder / JOURNAL_FILE, inputs, resume=not args.fresh)
    try:
        with _progress_bar(args, budget.metric.name) as step:
            def record(point: Any) -> None:
                journal.add(point)
                step(point)

            outcome = precision_search(model, report, statistics, full, quick, request, known=known, on_point=record)
    finally:
        journal.close()
    context = _Context(args=args, folder=folder, model=model, report=report, statistics=statistics, encoder=encoder,
                       budget=budget, data=data, feeds=request.feeds, skipped=skipped, load_start=load_start,
                       quick_samples=quick.data.samples, prepare_s=prepare_s)
    return _finish(context, outcome)


@dataclass(frozen=True, kw_only=True)
class _Context:
    """What the closing step needs from the run."""

    args: argparse.Namespace
    folder: Path
    model: Any
    report: Any
    statistics: Any
    encoder: Any
    budget: Budget
    data: SearchSlice
    feeds: Any
    skipped: dict[str, str]
    load_start: tuple[float, float, float]
    quick_samples: int
    prepare_s: float  # from the start to the first candidate: analysis, calibration, the slice's FP32 reference


def _test(ctx: _Context, model: Any) -> tuple[Any, float]:
    """The answer's AccuracyReport on the test split (the FP32 side cached in eval-cache) and its wall time."""
    import time

    import onnx

    from builder.cli.evaluate import BarProgress
    from builder.evaluate.evaluate import evaluate, load_eval_data, prepare_reference
    from builder.evaluate.progress import Progress
    from calib.artifact_io import sha256_file

    started = time.perf_counter()
    args = ctx.args
    data = load_eval_data(seed=args.seed, test_limit=args.test_samples, text_source=_text(args), window=args.window,
                          windows=args.test_windows, batch_size=args.batch_size, max_length=args.max_length)
    progress = Progress() if args.no_progress else BarProgress()
    fp32 = ctx.model
    reference = prepare_reference(fp32, data, encoder=ctx.encoder, cache_dir=ctx.folder / "eval-cache",
                                  model_sha256=sha256_file(args.model), progress=progress)
    assert isinstance(fp32, onnx.ModelProto)
    result = evaluate(fp32, model, ctx.report, data, reference, name=f"{ctx.folder.name}", refit=False,
                      progress=progress)
    return result, time.perf_counter() - started


def _finish(ctx: _Context, outcome: Any) -> int:
    """Write the answer (lowered), the test figures, the tables, the plot and search.json; exit 3 when unmet."""
    import os

    from builder.cli.steps import write_quantized
    from builder.pipeline import quantize_planned
    from builder.recipes.loader import recipe_to_yaml
    from builder.search.report import SearchReport, split_figures
    from calib.artifact_io import atomic_write_text
    from calib.errors import CalibrationError

    args, folder, budget = ctx.args, ctx.folder, ctx.budget
    feeds = ctx.feeds if outcome.plan.bias_correction_nodes else None
    quantized = quantize_planned(ctx.model, outcome.plan, ctx.statistics, feeds=feeds)
    write_quantized(folder, quantized, recipe_to_yaml(outcome.recipe))
    test, test_s = {}, 0.0
    if not args.no_test:
        accuracy, test_s = _test(ctx, quantized.model.model)
        atomic_write_text(folder / "test-report.json", accuracy.to_json())
        test = split_figures(accuracy)
    result, metric = outcome.result, budget.metric.name
    threshold = budget.threshold(result.reference)
    met = result.best is not None
    report = SearchReport(
        model=str(args.model), base_recipe=args.recipe, recipe_file="recipe.yaml", budget=budget.text, metric=metric,
        threshold=threshold, reference=result.reference, slice=ctx.data.description, samples=ctx.data.samples,
        quick_samples=ctx.quick_samples, granularity=args.granularity,
        fallback_precision=args.fallback_precision, met=met, stop=result.stop.value, feasible=result.feasible,
        answer=outcome.answer, units=tuple(u.key for u in outcome.units), sensitivity=result.sensitivity,
        order=result.order, presets_skipped={**ctx.skipped, **outcome.skipped_presets},
        timing=_timing(outcome, test_s, ctx, os.cpu_count() or 1), test=test,
        test_split="" if args.no_test else "VADER test split" if ctx.data.windows is None else
        f"evaluation slice of {_text(args)!r} ({args.test_windows} windows of {args.window} tokens)")
    _write_tables(folder, outcome, budget, threshold, report)
    atomic_write_text(folder / "search.json", report.to_json())
    _print_summary(report, outcome, folder)
    if not met:
        closest = outcome.answer
        gap = budget.shortfall(closest.value(metric), result.reference)
        why = ("even with every unit in 16 bits" if result.feasible is False else
               f"before the search finished ({result.stop.value})")
        value, bound = distinct(closest.value(metric), threshold)
        raise CalibrationError(
            f"budget {budget.text} not met {why}: the closest point has {metric} {value}, {gap:.3g} short of "
            f"{bound} (INT8 share {closest.share:.1%}); its recipe is in {folder / 'recipe.yaml'}")
    return 0


def distinct(value: float, bound: float) -> tuple[str, str]:
    """``value`` and ``bound`` with the fewest significant digits (6 at least) that tell them apart."""
    for digits in range(6, 18):
        shown = f"{value:.{digits}g}", f"{bound:.{digits}g}"
        if shown[0] != shown[1]:
            return shown
    return shown


def _timing(outcome: Any, test_s: float, ctx: _Context, cpus: int) -> Any:
    import os

    from builder.search.report import Timing

    points = outcome.result.points
    new = [p for p in points if not p.reused]
    return Timing(prepare_s=round(ctx.prepare_s, 1), search_s=round(outcome.result.seconds, 1),
                  presets_s=round(sum(p.measurement.seconds for p in outcome.presets if not p.reused), 1),
                  test_s=round(test_s, 1), new_evaluations=len(new), recorded_evaluations=len(points) - len(new),
                  segments_run=sum(p.measurement.segments_run for p in new),
                  segments_total=sum(p.measurement.segments_total for p in new),
                  evaluation_s=round(sum(p.measurement.seconds for p in new), 1), cpus=cpus,
                  load_start=ctx.load_start, load_end=os.getloadavg())


def _write_tables(folder: Path, outcome: Any, budget: Budget, threshold: float, report: Any) -> None:
    from builder.search.budget import metrics_for
    from builder.search.report import CandidateTable, format_candidates, pareto_png
    from calib.artifact_io import atomic_write_bytes, atomic_write_text

    metric, higher = budget.metric.name, budget.metric.higher_is_better
    points = (*outcome.result.points, *outcome.presets)
    names = [m.name for m in metrics_for(budget.metric.kind) if any(m.name in p.measurement.metrics for p in points)]
    atomic_write_text(folder / "candidates.json", CandidateTable(metric=metric, threshold=threshold,
                                                                 points=points).to_json())
    table = format_candidates(points, [u.key for u in outcome.units], names, metric, threshold, higher)
    atomic_write_text(folder / "candidates.md", f"# Precision search: {report.model}, {report.base_recipe}, "
                      f"budget {budget.text}\n\nSlice: {report.slice}. Quick slice (sensitivity): "
                      f"{report.quick_samples}.\n\n{table}")
    title = (f"{Path(report.model).stem} from {report.base_recipe}: budget {budget.text}, "
             f"{report.samples} held-out samples")
    atomic_write_bytes(folder / "pareto.png", pareto_png(outcome.result.points, outcome.presets, outcome.answer,
                                                         metric, threshold, higher, title))


def _print_summary(report: Any, outcome: Any, folder: Path) -> None:
    t, answer, metric = report.timing, outcome.answer, report.metric
    skipped = 1.0 - t.segments_run / t.segments_total if t.segments_total else 0.0
    print(f"search: {t.new_evaluations} candidates measured, {t.recorded_evaluations} from the journal, "
          f"{t.search_s:.1f} s after {t.prepare_s:.1f} s of analysis, calibration and FP32 reference ({t.cpus} CPUs, "
          f"load {t.load_start[0]:.1f} -> {t.load_end[0]:.1f}); the prefix cache skipped {skipped:.0%} of the blocks; "
          f"stopped: {report.stop}")
    verdict = "met" if report.met else "NOT met"
    print(f"answer: INT8 share {answer.share:.1%} of GEMM MACs, {len(answer.fallback)} units in "
          f"{report.fallback_precision} ({answer.islands} islands), {metric} {answer.value(metric):.6g} on the slice "
          f"(budget {report.budget}: {verdict})")
    if answer.fallback:
        print(f"  16-bit units: {', '.join(answer.fallback)}")
    if report.test:
        shown = ", ".join(f"{k} {v:.6g}" for k, v in report.test.items())
        print(f"test split ({report.test_split}; reported apart, not used by the search): {shown}")
    for p in outcome.presets:
        print(f"  preset {p.label:16s} INT8 {p.share:6.1%}  {metric} {p.value(metric):.6g}")
    print(f"wrote {folder / 'recipe.yaml'}, model.onnx, plan.json, candidates.json, candidates.md, pareto.png, "
          f"search.json{'' if not report.test else ', test-report.json'}")
