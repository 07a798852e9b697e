"""CLI stage: pipeline steps that touch disk, shared by ``calibrate``, ``run`` (the one-shot pipeline) and ``demo``.

Each step reads and writes files in one engine folder (``engines/<name>/``, DESIGN.md section 6) and reuses
its earlier output when its inputs are unchanged. Reuse is keyed by a hash of every input, recorded in
``stages.json``; the step reports whether it reused, so the CLI can say so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from calib.artifact_io import atomic_write_json, canonical_json, read_json, sha256_file, sha256_text

if TYPE_CHECKING:
    import onnx

    from builder.graph.report import GraphReport
    from builder.recipes.model import Recipe
    from calib.calibrate import RangeSpec
    from calib.collect import Collection
    from calib.outliers import OutlierReport
    from calib.range_table import RangeTable
    from calib.tensor_stats import TensorStats

STAGES_FILE = "stages.json"
STATE_FILE = "calibration_state.npz"
Label = tuple[int | None, str]


@dataclass(frozen=True, kw_only=True)
class CalibSettings:
    """Where calibration text comes from and how it is batched (the ``calibration data`` flag group)."""

    data: str = "vader"
    samples: int = 512
    seed: int = 0
    batch_size: int = 16
    max_length: int = 128
    tokenizer: Path | None = None  # None: the bundled MiniLM tokenizer
    bins: int = 2048

    def tokenizer_path(self) -> Path:
        if self.tokenizer is not None:
            return self.tokenizer
        from builder.intake.minilm import tokenizer_json_path

        return tokenizer_json_path()


@dataclass(frozen=True, kw_only=True)
class StepOutcome:
    """What a step did: its name, whether it reused earlier output, a one-line summary and its wall time."""

    step: str
    reused: bool
    summary: str
    seconds: float


class StageRecord:
    """The input keys of the steps whose outputs lie in ``folder`` (``stages.json``)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / STAGES_FILE
        data = read_json(self.path) if self.path.is_file() else {}
        self._keys: dict[str, str] = dict(data) if isinstance(data, dict) else {}

    def fresh(self, step: str, key: str, outputs: Sequence[Path]) -> bool:
        """True when ``step`` last ran with ``key`` and all of its ``outputs`` still exist."""
        return self._keys.get(step) == key and all(p.is_file() for p in outputs)

    def record(self, step: str, key: str) -> None:
        self._keys[step] = key
        atomic_write_json(self.path, self._keys)


def stage_key(**parts: Any) -> str:
    """Hash of a step's inputs (JSON-serializable values; files by their SHA-256)."""
    return sha256_text(canonical_json(parts))


def tensor_labels(report: GraphReport) -> dict[str, Label]:
    """(layer, role) of every tensor the analysis names: node outputs, and ``<role>.input`` for GEMM inputs."""
    from builder.graph.targets import GEMM_ROLES

    labels: dict[str, Label] = {}
    for a in report.assignments:
        for name in a.outputs:
            labels.setdefault(name, (a.layer, a.role.value))
    for a in report.assignments:
        if a.role in GEMM_ROLES:
            for name in a.inputs:
                labels.setdefault(name, (a.layer, f"{a.role.value}.input"))
    return labels


def collect_statistics(model_path: Path, tensors: Sequence[str], settings: CalibSettings, folder: Path, *,
                       fresh: bool = False, progress: bool = True) -> Collection:
    """Run the collector over the calibration text, checkpointing into ``folder`` (resumes; reuses a finished run)."""
    from tqdm import tqdm

    from calib.collect import CollectOptions, collect
    from calib.data import calibration_texts
    from calib.errors import ConfigError
    from calib.tokenize import encode

    if settings.samples < 1 or settings.batch_size < 1:
        raise ConfigError(f"samples {settings.samples} and batch size {settings.batch_size} must be at least 1")
    texts = calibration_texts(settings.data, settings.samples, settings.seed)
    state = folder / STATE_FILE
    if fresh:
        state.unlink(missing_ok=True)
    bar = tqdm(total=math.ceil(len(texts) / settings.batch_size), unit="batch", desc="calibrating",
               disable=not progress)

    def advance(batches: int, samples: int) -> None:
        bar.update(batches - bar.n)

    options = CollectOptions(num_bins=settings.bins, checkpoint=state, data_source=f"{settings.data}:{len(texts)}",
                             progress=advance)
    try:
        feeds = encode(texts, settings.tokenizer_path(), settings.max_length, settings.batch_size,
                       sort_by_length=True)
        return collect(model_path, feeds, tensors, options)
    finally:
        bar.close()


def write_ranges(table: RangeTable, folder: Path, header: str, stem: str = "ranges") -> list[Path]:
    """Write ``<stem>.json`` (RangeTable) and, for the primary table, ``calibration.cache`` (TensorRT's format)."""
    from calib.artifact_io import atomic_write_text
    from calib.cache import cache_from_ranges, format_cache

    written = [folder / f"{stem}.json"]
    atomic_write_text(written[0], table.to_json())
    if stem == "ranges":
        written.append(folder / "calibration.cache")
        atomic_write_text(written[1], format_cache(cache_from_ranges(table, header)))
    return written


def write_outliers(stats: Mapping[str, TensorStats], labels: Mapping[str, Label], folder: Path,
                   tokenizer: Path) -> tuple[OutlierReport, list[Path]]:
    """The Bondarenko-style outlier report as JSON, Markdown and per-dimension range plots."""
    from tokenizers import Tokenizer

    from calib.outliers import outlier_report, write_outlier_report

    vocab = Tokenizer.from_file(str(tokenizer))
    report = outlier_report(stats, labels, token_name=lambda i: str(vocab.id_to_token(i) or f"<{i}>"))
    return report, write_outlier_report(report, stats, labels, folder)


def spec_label(spec: RangeSpec) -> str:
    return spec.method.value if spec.percentile is None else f"{spec.method.value}-{spec.percentile:g}"


def decide_ranges(collection: Collection, recipe: Recipe, primary: RangeSpec, folder: Path, *, model_name: str,
                  data_source: str, header: str) -> list[RangeTable]:
    """The recipe's RangeTables from one collection; the first is ``ranges.json``, others ``ranges-<method>.json``."""
    from builder.plan.ranges import required_specs, tables_for_recipe

    tables = tables_for_recipe(collection, recipe, primary, model_name=model_name, data_source=data_source)
    for index, (spec, table) in enumerate(zip(required_specs(recipe, primary), tables, strict=True)):
        write_ranges(table, folder, header, "ranges" if index == 0 else f"ranges-{spec_label(spec)}")
    return tables


def calibration_feeds(settings: CalibSettings) -> list[dict[str, Any]]:
    """The calibration texts of ``settings`` tokenized into batches (the same texts the collector sees)."""
    from calib.data import calibration_texts
    from calib.tokenize import encode

    texts = calibration_texts(settings.data, settings.samples, settings.seed)
    return list(encode(texts, settings.tokenizer_path(), settings.max_length, settings.batch_size,
                       sort_by_length=True))


def quantize_step(  # noqa: PLR0913 -- the step's inputs plus the calibration data that bias correction reads
        model_path: Path, model: onnx.ModelProto, report: GraphReport, recipe: Recipe,
        tables: Sequence[RangeTable], flagged: tuple[int, ...] | None, variant: str,
        folder: Path, *, calibration: CalibSettings | None = None) -> tuple[StepOutcome, str]:
    """Plan and lower into ``folder/model.onnx`` (+ plan.json, recipe.yaml, precision.json), or reuse them.

    ``calibration`` gives the texts for recipes that set ``bias_correction`` (ignored otherwise).
    """
    from builder.lower.quantize import lower_with_correction
    from builder.plan.flops import gemm_flops
    from builder.plan.planner import plan
    from builder.recipes.loader import recipe_to_yaml
    from calib.artifact_io import atomic_write_bytes, atomic_write_text

    started = time.perf_counter()
    recipe_yaml = recipe_to_yaml(recipe)
    outputs = [folder / "model.onnx", folder / "plan.json", folder / "recipe.yaml", folder / "precision.json"]
    key = stage_key(model=sha256_file(model_path), recipe=recipe_yaml, variant=variant,
                    flagged=list(flagged) if flagged is not None else None,
                    ranges=[sha256_text(t.to_json()) for t in tables],
                    **({"calibration": repr(calibration)} if recipe.uses_bias_correction else {}))
    record = StageRecord(folder)
    if record.fresh("quantize", key, outputs):
        from builder.plan.artifact import QuantPlan

        share = QuantPlan.from_json((folder / "plan.json").read_text(encoding="utf-8")).int8_gemm_flop_share
        return StepOutcome(step="quantize", reused=True, summary=f"{recipe.name}, INT8 GEMM-FLOP share {share:.1%}",
                           seconds=time.perf_counter() - started), recipe_yaml
    quant_plan = plan(report, recipe, list(tables), outliers=flagged, flops=gemm_flops(model, report, 128),
                      seq_len=128)
    feeds = calibration_feeds(calibration) if calibration is not None and quant_plan.bias_correction_nodes else None
    lowered = lower_with_correction(model, quant_plan, variant, feeds)
    atomic_write_bytes(outputs[0], lowered.serialize())
    atomic_write_text(outputs[1], quant_plan.to_json())
    atomic_write_text(outputs[2], recipe_yaml)
    atomic_write_json(outputs[3], lowered.precision)
    record.record("quantize", key)
    kept = sum(1 for n in quant_plan.nodes if n.precision.value != "int8")
    summary = (f"{recipe.name} ({variant}): {len(quant_plan.activations)} quantized activations, "
               f"{len(quant_plan.weights)} INT8 weights, {kept} nodes kept in higher precision, "
               f"INT8 GEMM-FLOP share {quant_plan.int8_gemm_flop_share:.1%}")
    return StepOutcome(step="quantize", reused=False, summary=summary, seconds=time.perf_counter() - started), \
        recipe_yaml
