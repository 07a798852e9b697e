"""CLI stage: pipeline steps that touch disk, shared by ``calibrate``, ``quantize``, the one-shot and ``demo``.

Each step reads and writes files in one engine folder (``engines/<name>/``) and reuses its earlier output
when its inputs are unchanged. Reuse is keyed by a hash of every input, recorded in ``stages.json``; the step
reports whether it reused, so the CLI can say so. The work itself is the library pipeline (builder.pipeline).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from calib.artifact_io import atomic_write_json, atomic_write_text, canonical_json, sha256_file, sha256_text
from calib.errors import ConfigError
from calib.histogram import DEFAULT_BINS
from calib.schema import Schema, decode_json, to_json

if TYPE_CHECKING:
    import onnx

    from builder.graph.report import GraphReport
    from builder.plan.artifact import QuantPlan
    from builder.recipes.model import Recipe
    from calib.collect import CollectResult
    from calib.outliers import OutlierReport
    from calib.ranges import RangeSpec
    from calib.statistics import Statistics
    from calib.text_encoder import TextEncoder

logger = logging.getLogger(__name__)

STAGES_FILE = "stages.json"
STAGES_VERSION = 2  # 1: a flat {step: key} object without a version; 2: {"steps": {...}, "version": 2}
STATE_FILE = "statistics.npz"
HESSIAN_FILE = "hessians.npz"  # the second pass of OPTQ's Hessians (builder.pipeline.calibrate_weight_inputs)
CHECKPOINT_EVERY = 8  # batches between Hessian checkpoints (one K x K exact sum per GEMM input: ~270 MB on MiniLM)
OUTPUTS = ("model.onnx", "plan.json", "recipe.yaml", "precision.json")


@dataclass(frozen=True, kw_only=True)
class CalibSettings:
    """Where calibration text comes from and how it is batched (the ``calibration data`` flag group)."""

    data: str = "vader"
    samples: int = 512
    seed: int = 0
    batch_size: int = 16
    max_length: int = 128
    tokenizer: Path | None = None  # None: found next to the model (the bundled MiniLM's for the bundled model)
    input_map: tuple[str, ...] = ()  # --input-map role=name items (tokens, mask, token_types, positions)
    bins: int = DEFAULT_BINS

    def encoder(self, model: Path | onnx.ModelProto) -> TextEncoder:
        """The checked text encoder of ``model`` (tokenizer found or given; vocabulary against the embedding)."""
        from builder.evaluate.tokenizer import model_text_encoder
        from calib.model_inputs import parse_input_map

        return model_text_encoder(model, self.tokenizer, parse_input_map(list(self.input_map)))

    @property
    def source(self) -> str:
        return f"{self.data}:{self.samples}"


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """What a step did: its name, whether it reused earlier output, a one-line summary and its wall time."""

    step: str
    reused: bool
    summary: str
    seconds: float


class StageKeys(Schema, frozen=True, kw_only=True):
    """``stages.json``: per step, the hash of the inputs its outputs in this folder were made from."""

    steps: dict[str, str] = msgspec.field(default_factory=dict)
    version: int = STAGES_VERSION

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); :meth:`from_json` reads it back equal."""
        return to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = STAGES_FILE) -> StageKeys:
        """Decode ``stages.json``; a wrong version, an unknown key or a bad value raises ConfigError."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where} is not valid JSON: {exc}") from None
        if isinstance(data, dict) and "version" not in data:  # version 1 carried no version key
            raise ConfigError(f"{where} version 1 (a flat step -> key object) not supported; expected {STAGES_VERSION}")
        return decode_json(text, cls, where, version=STAGES_VERSION)


class StageRecord:
    """The input keys of the steps whose outputs lie in ``folder`` (``stages.json``, a :class:`StageKeys`)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STAGES_FILE
        self._keys: dict[str, str] = {}
        if self.path.is_file():
            try:
                self._keys = dict(StageKeys.from_json(self.path.read_bytes(), str(self.path)).steps)
            except ConfigError as exc:  # a cache of reuse keys: what it cannot vouch for runs again
                logger.warning("%s; every step of this folder runs afresh and rewrites it", exc)

    def fresh(self, step: str, key: str, outputs: Sequence[Path]) -> bool:
        """True when ``step`` last ran with ``key`` and all of its ``outputs`` still exist."""
        return self._keys.get(step) == key and all(p.is_file() for p in outputs)

    def record(self, step: str, key: str) -> None:
        self._keys[step] = key
        atomic_write_text(self.path, StageKeys(steps=dict(self._keys)).to_json())


def stage_key(**parts: Any) -> str:
    """Hash of a step's inputs (JSON-serializable values; files by their SHA-256)."""
    return sha256_text(canonical_json(parts))


def calibration_feeds(settings: CalibSettings, encoder: TextEncoder) -> list[dict[str, Any]]:
    """The calibration texts of ``settings`` encoded into the model's feeds (the batches the collector sees)."""
    from calib.data import calibration_texts
    from calib.errors import ConfigError

    if settings.samples < 1 or settings.batch_size < 1:
        raise ConfigError(f"samples {settings.samples} and batch size {settings.batch_size} must be at least 1")
    texts = calibration_texts(settings.data, settings.samples, settings.seed)
    return list(encoder.feeds(texts, settings.max_length, settings.batch_size, sort_by_length=True))


def collect_statistics(model: onnx.ModelProto | Path, tensors: Sequence[str], settings: CalibSettings,
                       folder: Path, encoder: TextEncoder, *, fresh: bool = False,
                       progress: bool = True) -> CollectResult:
    """Calibrate into ``folder/statistics.npz`` (resumes an interrupted run; reuses a finished one).

    ``model`` is the float model (a prepared ModelProto, e.g. with weight-only quantized weights folded) or a
    file to read; ``encoder`` (:meth:`CalibSettings.encoder`) turns the calibration texts into its feeds."""
    from tqdm import tqdm

    from calib.collect import CollectOptions, collect

    feeds = calibration_feeds(settings, encoder)
    state = folder / STATE_FILE
    if fresh:
        state.unlink(missing_ok=True)
    bar = tqdm(total=len(feeds), unit="batch", desc="calibrating", disable=not progress)

    def advance(batches: int, samples: int) -> None:
        bar.update(batches - bar.n)

    inputs = encoder.inputs
    options = CollectOptions(bins=settings.bins, checkpoint=state, data_source=settings.source, progress=advance,
                             mask_input=inputs.mask or "attention_mask", ids_input=inputs.tokens)
    try:
        return collect(model, feeds, tensors, options)
    finally:
        bar.close()


def load_statistics(path: Path) -> Statistics:
    """Statistics from a ``statistics.npz`` file or the folder ``calibrate`` wrote it into."""
    from calib.errors import ConfigError
    from calib.statistics import Statistics

    target = path / STATE_FILE if path.is_dir() else path
    if path.name == "ranges.json":  # the folder's view; its statistics lie beside it
        target = path.with_name(STATE_FILE)
    if not target.is_file():
        raise ConfigError(f"no calibration statistics at {str(target)!r}; run `build-engine calibrate MODEL -o "
                          f"{target.parent}` first (it writes {STATE_FILE})")
    statistics = Statistics.load(target)
    if not statistics.meta.complete:
        raise ConfigError(f"the calibration in {str(target)!r} did not finish; run `build-engine calibrate` again "
                          "into that folder to resume it (with --fresh to start over)")
    return statistics


def weight_statistics(source: onnx.ModelProto | Path, plan: QuantPlan, statistics: Statistics,
                      feeds: Sequence[Mapping[str, Any]], folder: Path, *, data_source: str,
                      progress: bool = True) -> Statistics:
    """``statistics`` with what the plan's weight quantizers lack (OPTQ's Hessians), collected on the
    calibration ``feeds`` (:func:`calibration_feeds`) into ``folder/hessians.npz`` (resumed when
    interrupted, reused when complete; one of other tensors, model or data is started over). ``source`` is
    what calibration ran (the model file, or the prepared ModelProto when weights were folded)."""
    from tqdm import tqdm

    from builder.pipeline import calibrate_weight_inputs
    from builder.weights.hessians import missing
    from calib.collect import CollectOptions
    from calib.statistics import Statistics

    wanted = missing(plan, statistics)
    if not wanted:
        return statistics
    checkpoint = folder / HESSIAN_FILE
    if checkpoint.is_file():
        meta = Statistics.load(checkpoint).meta
        if (meta.tensors != tuple(wanted) or meta.model_sha256 != statistics.meta.model_sha256
                or (meta.complete and meta.data_digest != statistics.meta.data_digest)):
            checkpoint.unlink()  # a cache of another recipe, model or data
    bar = tqdm(total=len(feeds), unit="batch", desc=f"Hessians of {len(wanted)} GEMM inputs", disable=not progress)

    def advance(batches: int, samples: int) -> None:
        del samples
        bar.update(batches - bar.n)

    options = CollectOptions(checkpoint=checkpoint, checkpoint_every=CHECKPOINT_EVERY, data_source=data_source,
                             progress=advance)
    try:
        return calibrate_weight_inputs(source, plan, statistics, feeds, options)
    finally:
        bar.close()


def write_ranges(statistics: Statistics, spec: RangeSpec, folder: Path, *, model_name: str,
                 header: str) -> list[Path]:
    """Write ``ranges.json`` (the RangeTable view under ``spec``) and ``calibration.cache`` (TensorRT's format)."""
    from calib.artifact_io import atomic_write_text
    from calib.cache import cache_from_ranges, format_cache
    from calib.ranges import range_table

    table = range_table(statistics, spec, model_name=model_name)
    written = [folder / "ranges.json", folder / "calibration.cache"]
    atomic_write_text(written[0], table.to_json())
    atomic_write_text(written[1], format_cache(cache_from_ranges(table, header)))
    return written


def write_outliers(report: GraphReport, statistics: Statistics, folder: Path,
                   encoder: TextEncoder) -> tuple[OutlierReport, list[Path]]:
    """The Bondarenko-style outlier report as JSON, Markdown and per-dimension range plots."""
    from builder.pipeline import outliers, tensor_labels
    from calib.outliers import write_outlier_report

    result = outliers(report, statistics, token_name=lambda i: encoder.decode([i]) or f"<{i}>")
    return result, write_outlier_report(result, statistics.tensors, tensor_labels(report), folder)


def quantize_step(  # noqa: PLR0913 -- the step's inputs plus the calibration data that bias correction reads
        model_path: Path, model: onnx.ModelProto, report: GraphReport, recipe: Recipe, statistics: Statistics,
        flagged: tuple[int, ...] | None, variant: str, folder: Path, *,
        calibration: CalibSettings | None = None) -> StepOutcome:
    """Plan, quantize the weights and lower into ``folder/model.onnx`` (+ plan.json, recipe.yaml,
    precision.json), or reuse them. ``calibration`` gives the texts for recipes that set ``bias_correction``."""
    from builder.pipeline import plan_model, quantize_planned
    from builder.plan.artifact import load_plan
    from builder.plan.planner import statistics_digest
    from builder.recipes.loader import recipe_to_yaml
    from builder.weights.hessians import recipe_needs_data

    started = time.perf_counter()
    uses_data = recipe.uses_bias_correction or recipe_needs_data(recipe)  # bias correction, OPTQ, GPFQ
    recipe_yaml = recipe_to_yaml(recipe)
    outputs = [folder / name for name in OUTPUTS]
    key = stage_key(model=sha256_file(model_path), recipe=recipe_yaml, variant=variant,
                    flagged=list(flagged) if flagged is not None else None,
                    statistics=statistics_digest(statistics),
                    **({"calibration": repr(calibration)} if uses_data else {}))
    record = StageRecord(folder)
    if record.fresh("quantize", key, outputs):
        share = load_plan((folder / "plan.json").read_text(encoding="utf-8")).int8_gemm_flop_share
        return StepOutcome(step="quantize", reused=True, summary=f"{recipe.name}, INT8 GEMM-FLOP share {share:.1%}",
                           seconds=time.perf_counter() - started)
    feeds = (calibration_feeds(calibration, calibration.encoder(model_path))
             if calibration is not None and uses_data else None)
    # what calibration ran: the file, or the prepared ModelProto when weights were folded
    source = model_path if sha256_file(model_path) == statistics.meta.model_sha256 else model
    quant_plan = plan_model(model, report, recipe, statistics, flagged=flagged, feeds=feeds, source=source)
    if feeds is not None and calibration is not None:  # OPTQ's Hessians: one resumable pass (folder/hessians.npz)
        statistics = weight_statistics(source, quant_plan, statistics, feeds, folder, data_source=calibration.source)
    result = quantize_planned(model, quant_plan, statistics, variant=variant, feeds=feeds)
    write_quantized(folder, result, recipe_yaml)
    record.record("quantize", key)
    return StepOutcome(step="quantize", reused=False, summary=quantize_summary(result, variant),
                       seconds=time.perf_counter() - started)


def write_quantized(folder: Path, result: Any, recipe_yaml: str | None) -> list[Path]:
    """model.onnx, plan.json, recipe.yaml (when planned from a recipe) and precision.json of a
    builder.pipeline.Quantized, each atomically."""
    from calib.artifact_io import atomic_write_bytes, atomic_write_text

    outputs = [folder / name for name in OUTPUTS]
    atomic_write_bytes(outputs[0], result.model.serialize())
    atomic_write_text(outputs[1], result.plan.to_json())
    if recipe_yaml is not None:
        atomic_write_text(outputs[2], recipe_yaml)
    atomic_write_json(outputs[3], result.model.precision)
    return outputs


def quantize_summary(result: Any, variant: str) -> str:
    """One line: what the plan quantized (activations, weights by bit width, weight-only GEMMs) and kept."""
    from collections import Counter

    plan = result.plan
    kept = sum(1 for n in plan.nodes if n.precision.value != "int8")
    quantized = sum(1 for a in plan.activations if a.quantizer != "none")
    widths = Counter(int(getattr(w.config, "bits", 8)) for w in plan.weights)
    weights = ", ".join(f"{count} {bits}-bit" for bits, count in sorted(widths.items(), reverse=True)) or "0"
    weight_only = len(plan.weight_only_nodes)
    return (f"{plan.recipe_name} ({variant}): {quantized} quantized activations, {weights} integer weights"
            f"{f' ({weight_only} GEMMs weight-only)' if weight_only else ''}, {kept} nodes kept in higher "
            f"precision, INT8 GEMM-FLOP share {plan.int8_gemm_flop_share:.1%}")

