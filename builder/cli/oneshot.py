"""CLI stage: the one-shot pipeline's driver, shared by ``build-engine model.onnx ...`` and ``demo``.

analyze -> calibrate (real text, resumable) -> ranges/outliers -> quantize (recipe -> Q/DQ ONNX) -> build
(engine + manifest) -> evaluate (accuracy against the FP32 model). Each step is the library pipeline
(builder.pipeline) plus the disk work of builder.cli.steps: every step reuses its output when its inputs are
unchanged and says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.cli.steps import CalibSettings, StepOutcome

if TYPE_CHECKING:
    from builder.backends.options import BuildOptions
    from builder.cli.common import WeightFlags
    from builder.evaluate.evaluate import EvalData, Reference
    from builder.evaluate.report import AccuracyReport
    from builder.graph.report import GraphReport
    from builder.intake.prepare import PreparedModel
    from calib.ranges import RangeSpec
    from calib.statistics import Statistics
    from calib.text_encoder import TextEncoder

CACHE_HEADER_VERSION = "10.3.0"


@dataclass(frozen=True, kw_only=True)
class PipelineRequest:
    """One pipeline run: the model, where its artifacts go and how each step is done."""

    model_path: Path
    folder: Path
    recipe: str
    fallbacks: tuple[str, ...] = ()
    weights: WeightFlags | None = None  # --weights and its options: a last rule for every INT8 weight GEMM
    variant: str = "portable"
    calibration: CalibSettings
    ranges_view: RangeSpec  # the method of ranges.json / calibration.cache
    build: BuildOptions | None  # None: stop after the Q/DQ ONNX
    fresh: bool = False
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class PipelineResult:
    """What one pipeline run produced (for the summary table)."""

    folder: Path
    recipe: str
    outcomes: tuple[StepOutcome, ...]
    accuracy: AccuracyReport | None
    engine: str | None  # "<backend> <version>, <size> MiB, <arch>" or None without a build


def timed(step: str, fn: Callable[[], tuple[bool, str]]) -> StepOutcome:
    started = time.perf_counter()
    reused, summary = fn()
    return StepOutcome(step=step, reused=reused, summary=summary, seconds=time.perf_counter() - started)


def print_outcome(index: int, total: int, outcome: StepOutcome) -> None:
    state = "reused (inputs unchanged)" if outcome.reused else f"done in {outcome.seconds:.1f} s"
    print(f"[{index}/{total}] {outcome.step:9s} {state}: {outcome.summary}", flush=True)


def calibrate_model(model: PreparedModel, report: GraphReport, settings: CalibSettings, folder: Path,
                    encoder: TextEncoder, *, fresh: bool, progress: bool) -> tuple[Statistics, StepOutcome]:
    """Collect statistics (checkpointed in ``folder``; a finished collection is reused)."""
    from builder.cli.steps import STATE_FILE, collect_statistics
    from builder.pipeline import calibration_tensors

    holder: dict[str, Any] = {}

    def step() -> tuple[bool, str]:
        tensors = calibration_tensors(model.model, report)
        source = model.model if model.rewritten else model.path
        result = collect_statistics(source, tensors, settings, folder, encoder, fresh=fresh, progress=progress)
        holder["statistics"] = result.statistics
        batches = result.statistics.batches
        reused = result.resumed_batches == batches and batches > 0
        checkpoint = ""
        if 0 < result.resumed_batches < batches:
            checkpoint = (f"; resumed from {folder / STATE_FILE} after {result.resumed_batches} of {batches} "
                          "batches (--fresh starts over)")
        elif reused:
            checkpoint = f"; from {folder / STATE_FILE} (--fresh recalibrates)"
        return reused, f"{len(tensors)} tensors on {result.statistics.samples} texts ({settings.data}){checkpoint}"

    outcome = timed("calibrate", step)
    return holder["statistics"], outcome


def build_step(folder: Path, options: BuildOptions) -> tuple[StepOutcome, str]:
    """Build the engine for ``folder/model.onnx`` (or reuse it)."""
    from builder.engine.build import MODEL_FILE, BuildInputs, build_engine_dir

    holder: dict[str, str] = {}

    def step() -> tuple[bool, str]:
        outcome = build_engine_dir(BuildInputs.beside(folder / MODEL_FILE), options, folder)
        m = outcome.manifest
        holder["engine"] = (f"{m.backend} {m.backend_version}, {m.plan_bytes / 2**20:.0f} MiB, "
                            f"{','.join(m.architectures)}")
        return outcome.reused, f"{m.plan_file} ({holder['engine']}), built in {m.build_time_s:.1f} s"

    outcome = timed("build", step)
    return outcome, holder["engine"]


def evaluate_step(fp32_path: Path, folder: Path, report: GraphReport, data: EvalData, reference: Reference,
                  name: str) -> tuple[AccuracyReport, StepOutcome]:
    """Evaluate ``folder/model.onnx`` against the FP32 model into ``report.json`` (or reuse it)."""
    import onnx

    from builder.cli.steps import StageRecord, stage_key
    from builder.evaluate.evaluate import evaluate
    from builder.evaluate.report import AccuracyReport
    from calib.artifact_io import atomic_write_text, sha256_file

    holder: dict[str, AccuracyReport] = {}

    def step() -> tuple[bool, str]:
        out = folder / "report.json"
        key = stage_key(fp32=sha256_file(fp32_path), model=sha256_file(folder / "model.onnx"),
                        train=len(data.train_texts), test=len(data.test_texts), pairs=len(data.pairs),
                        test_sha=stage_key(texts=list(data.test_texts)))
        record = StageRecord(folder)
        reused = record.fresh("evaluate", key, [out])
        if reused:
            result = AccuracyReport.from_json(out.read_text(encoding="utf-8"))
        else:
            result = evaluate(onnx.load(str(fp32_path)), onnx.load(str(folder / "model.onnx")), report, data,
                              reference, name=name)
            atomic_write_text(out, result.to_json())
            record.record("evaluate", key)
        holder["report"] = result
        return reused, result.headline()

    outcome = timed("evaluate", step)
    return holder["report"], outcome


def run_pipeline(request: PipelineRequest, *, statistics: Statistics | None = None,
                 evaluation: Callable[[], tuple[EvalData, Reference]] | None = None
                 ) -> tuple[PipelineResult, Statistics]:
    """Run every step for one recipe; ``statistics`` lets several recipes share one calibration.

    ``evaluation`` gives the evaluation data and FP32 reference when first called (after the recipe, the
    tokenizer and the calibration were checked, so bad input never waits for the reference)."""
    from builder.cli.steps import quantize_step, write_outliers, write_ranges
    from builder.intake.prepare import prepare_model
    from builder.pipeline import analyze_model, needs_flagged, resolve_recipe
    from builder.weights.preflight import check_recipe
    from calib.cache import tensorrt_header

    prepared = prepare_model(request.model_path)
    if prepared.rewritten:
        print(prepared.describe(), flush=True)
    model = prepared.model
    report = analyze_model(model, request.model_path.stem)
    recipe = resolve_recipe(request.recipe, report, request.fallbacks)  # bad recipes fail before calibration
    if request.weights is not None:
        recipe = request.weights.apply(recipe, report)
    check_recipe(model, report, recipe)  # so do weight configs that do not fit the GEMMs (block, tile)
    if request.build is not None:
        from builder.engine.build import check_profiles_for

        check_profiles_for(model, request.build)  # so do shape profiles the graph cannot take (a KV cache: --past)
    encoder = request.calibration.encoder(request.model_path)  # so does a missing or mismatched tokenizer
    total = 3 + (request.build is not None) + (evaluation is not None)
    outcomes: list[StepOutcome] = []

    def show(outcome: StepOutcome) -> None:
        outcomes.append(outcome)
        print_outcome(len(outcomes), total, outcome)

    request.folder.mkdir(parents=True, exist_ok=True)
    if statistics is None:
        statistics, outcome = calibrate_model(prepared, report, request.calibration, request.folder, encoder,
                                              fresh=request.fresh, progress=request.progress)
        show(outcome)
    else:
        show(StepOutcome(step="calibrate", reused=True, seconds=0.0,
                         summary=f"shared statistics of {statistics.samples} texts"))
    write_ranges(statistics, request.ranges_view, request.folder, model_name=request.model_path.stem,
                 header=tensorrt_header(CACHE_HEADER_VERSION))
    keep_tokenizer(encoder, request.folder)
    outliers, _ = write_outliers(report, statistics, request.folder, encoder)
    flagged = outliers.flagged_layers() if needs_flagged(recipe) else None
    show(StepOutcome(step="ranges", reused=False, seconds=0.0,
                     summary=f"ranges.json ({request.ranges_view.label}); outlier layers "
                             f"{list(outliers.flagged_layers())}"))
    show(quantize_step(request.model_path, model, report, recipe, statistics, flagged, request.variant,
                       request.folder, calibration=request.calibration))
    engine = None
    if request.build is not None:
        outcome, engine = build_step(request.folder, request.build)
        show(outcome)
    accuracy = None
    if evaluation is not None:
        accuracy, outcome = evaluate_step(request.model_path, request.folder, report, *evaluation(),
                                          name=recipe.name)
        show(outcome)
    result = PipelineResult(folder=request.folder, recipe=recipe.name, outcomes=tuple(outcomes),
                            accuracy=accuracy, engine=engine)
    return result, statistics


def keep_tokenizer(encoder: TextEncoder, folder: Path) -> None:
    """Copy the tokenizer.json the model was calibrated with beside the quantized model (so `evaluate` and
    serving find it there); a Hugging Face tokenizer folder is left where it is."""
    from calib.artifact_io import atomic_write_bytes

    source = encoder.info.tokenizer.path
    target = folder / "tokenizer.json"
    if source.is_file() and source.name == "tokenizer.json" and source.resolve() != target.resolve():
        data = source.read_bytes()
        if not target.is_file() or target.read_bytes() != data:
            atomic_write_bytes(target, data)


def evaluation_data(train: int | None, test: int | None, seed: int, fp32_path: Path, encoder: TextEncoder, *,
                    cache_dir: Path | None, progress: bool = True) -> tuple[EvalData, Reference]:
    """Evaluation splits (disjoint from calibration) and the FP32 reference outputs, computed once per model
    and data and cached in ``cache_dir`` (a re-run reads them back)."""
    import onnx

    from builder.cli.evaluate import BarProgress
    from builder.evaluate.evaluate import load_eval_data, prepare_reference
    from builder.evaluate.progress import Progress
    from calib.artifact_io import sha256_file

    data = load_eval_data(seed=seed, train_limit=train, test_limit=test)
    reference = prepare_reference(onnx.load(str(fp32_path)), data, encoder=encoder, cache_dir=cache_dir,
                                  model_sha256=sha256_file(fp32_path),
                                  progress=BarProgress() if progress else Progress())
    if reference.reused:
        print(f"FP32 reference reused from {reference.cache_file}", flush=True)
    return data, reference
