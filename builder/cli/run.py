"""CLI stage: the one-shot pipeline (``build-engine model.onnx --recipe ... -o engines/<name>``).

analyze -> calibrate (real text, resumable) -> quantize (recipe -> Q/DQ ONNX) -> build (engine + manifest)
-> evaluate (accuracy against the FP32 model). Every step reuses its output when its inputs are unchanged
and says so. ``demo`` runs the same steps on the bundled MiniLM for several recipes.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from builder.backends.options import BuildOptions
    from builder.cli.steps import CalibSettings, StepOutcome
    from builder.evaluate.evaluate import EvalData, Reference
    from builder.evaluate.report import AccuracyReport
    from builder.graph.report import GraphReport
    from calib.collect import Collection

HELP = """\
Run the whole pipeline on an ONNX model: analyze, calibrate, quantize, build, evaluate.

The model is calibrated on real text (--calib-data: vader, lee or a .txt/.jsonl file), lowered with a recipe
(--recipe: a preset or a YAML file, plus --fallback rules) into a Q/DQ ONNX graph, built into an engine with
the best available backend (--backend auto: full TensorRT if installed, else TensorRT-RTX ahead of time on
the CPU) and evaluated against the FP32 model on ONNX Runtime. All artifacts land in the output folder
(model.onnx, ranges.json, calibration.cache, recipe.yaml, plan.json, <backend>.plan, manifest.json,
report.json); a re-run reuses every step whose inputs are unchanged.
"""

EPILOG = """\
examples:
  build-engine model.onnx --recipe hero-m2 --calib-data vader --backend auto -o engines/minilm-hero-m2
  build-engine model.onnx --recipe int8-gemm --fallback layer.5.fc2=fp16 --arch sm86 -o engines/minilm-int8
  build-engine model.onnx --recipe bondarenko-mp --no-build -o engines/minilm-mp
  build-engine model.onnx --recipe hero-m3 --print-config

exit codes: 0 ok, 2 bad flag, recipe or input, 3 graph or calibration, 4 build, 5 missing backend
"""


def add_calib_data_arguments(group: argparse._ArgumentGroup) -> None:
    """Where calibration text comes from and how it is batched (read by :func:`calib_settings`)."""
    group.add_argument("--calib-data", "--data", dest="calib_data", default="vader",
                       help="vader, lee, or a .txt/.jsonl file (default: vader)")
    group.add_argument("--samples", type=int, default=512, help="calibration texts (default: 512)")
    group.add_argument("--seed", type=int, default=0, help="data split and shuffle seed (default: 0)")
    group.add_argument("--batch-size", type=int, default=16, help="texts per batch (default: 16)")
    group.add_argument("--max-length", type=int, default=128, help="tokens per text at most (default: 128)")
    group.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the bundled MiniLM tokenizer)")


def add_calibration_arguments(group: argparse._ArgumentGroup) -> None:
    """The calibration flag group of the pipeline: data, primary range method, fresh start."""
    add_calib_data_arguments(group)
    group.add_argument("--method", default="max", choices=("max", "percentile", "entropy", "mse"),
                       help="range method of ranges.json and calibration.cache; the recipe's own per-role "
                            "choices are decided from the same statistics (default: max)")
    group.add_argument("--percentile", type=float, help="percentile for --method percentile (e.g. 99.99)")
    group.add_argument("--fresh", action="store_true", help="ignore an existing calibration checkpoint")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from builder.cli.build import add_engine_arguments

    parser.add_argument("model", type=Path, help="ONNX model file (FP32)")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default: engines/<model>-<recipe>)")
    quant = parser.add_argument_group("quantization")
    quant.add_argument("--recipe", default="int8-gemm", help="preset name or recipe YAML (default: int8-gemm)")
    quant.add_argument("--fallback", action="append", default=[], metavar="TARGET=DTYPE",
                       help="keep layer.<i>[.<role>], role:<role> or name:<glob> in fp16/bf16/fp32 (repeatable)")
    quant.add_argument("--variant", choices=("portable", "plugin"), default="portable",
                       help="portable: standard ops + Q/DQ; plugin: fused LN+quant / softmax+quant nodes")
    add_calibration_arguments(parser.add_argument_group("calibration data"))
    add_engine_arguments(parser.add_argument_group("engine"))
    steps = parser.add_argument_group("steps")
    steps.add_argument("--no-build", action="store_true", help="stop after writing the Q/DQ ONNX")
    steps.add_argument("--no-evaluate", action="store_true", help="skip the accuracy evaluation")
    steps.add_argument("--eval-test", type=int, help="test sentences for the evaluation (default: the whole split)")
    steps.add_argument("--eval-train", type=int, help="probe train sentences (default: the whole split)")
    steps.add_argument("--no-progress", action="store_true", help="no progress bars")
    steps.add_argument("--print-config", action="store_true",
                       help="print the resolved recipe and build options, then exit")


@dataclass(frozen=True, kw_only=True)
class PipelineResult:
    """What one pipeline run produced (for the summary table)."""

    folder: Path
    recipe: str
    outcomes: tuple[StepOutcome, ...]
    accuracy: AccuracyReport | None
    engine: str | None  # "<backend> <version>, <size> MiB, <arch>" or None without a build


def calib_settings(args: argparse.Namespace) -> CalibSettings:
    from builder.cli.steps import CalibSettings

    return CalibSettings(data=args.calib_data, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                         max_length=args.max_length, tokenizer=args.tokenizer)


def _timed(step: str, fn: Callable[[], tuple[bool, str]]) -> StepOutcome:
    from builder.cli.steps import StepOutcome

    started = time.perf_counter()
    reused, summary = fn()
    return StepOutcome(step=step, reused=reused, summary=summary, seconds=time.perf_counter() - started)


def calibrate_model(model_path: Path, report: GraphReport, settings: CalibSettings, folder: Path, *,
                    fresh: bool, progress: bool) -> tuple[Collection, StepOutcome]:
    """Collect statistics (checkpointed in ``folder``; a finished collection is reused)."""
    import onnx

    from builder.cli.steps import collect_statistics
    from builder.graph.targets import calibration_tensors

    holder: dict[str, Any] = {}

    def step() -> tuple[bool, str]:
        model = onnx.load(str(model_path))
        tensors = calibration_tensors(model, report)
        collection = collect_statistics(model_path, tensors, settings, folder, fresh=fresh, progress=progress)
        holder["collection"] = collection
        reused = collection.resumed_batches == collection.batches and collection.batches > 0
        return reused, f"{len(tensors)} tensors on {collection.samples} texts ({settings.data})"

    outcome = _timed("calibrate", step)
    return holder["collection"], outcome


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

    outcome = _timed("build", step)
    return outcome, holder["engine"]


def evaluate_step(fp32_path: Path, folder: Path, report: GraphReport, data: EvalData, reference: Reference,
                  name: str) -> tuple[AccuracyReport, StepOutcome]:
    """Evaluate ``folder/model.onnx`` against the FP32 model into ``report.json`` (or reuse it)."""
    import onnx

    from builder.cli.steps import StageRecord, stage_key
    from builder.evaluate.evaluate import evaluate
    from builder.evaluate.report import AccuracyReport
    from calib.artifact_io import atomic_write_text, read_json, sha256_file

    holder: dict[str, AccuracyReport] = {}

    def step() -> tuple[bool, str]:
        out = folder / "report.json"
        key = stage_key(fp32=sha256_file(fp32_path), model=sha256_file(folder / "model.onnx"),
                        train=len(data.train_texts), test=len(data.test_texts), pairs=len(data.pairs),
                        test_sha=stage_key(texts=list(data.test_texts)))
        record = StageRecord(folder)
        reused = record.fresh("evaluate", key, [out])
        if reused:
            result = AccuracyReport.from_dict(read_json(out))
        else:
            result = evaluate(onnx.load(str(fp32_path)), onnx.load(str(folder / "model.onnx")), report, data,
                              reference, name=name)
            atomic_write_text(out, result.to_json())
            record.record("evaluate", key)
        holder["report"] = result
        return reused, (f"probe {100 * result.probe_accuracy:.2f}% (FP32 {100 * result.reference_probe_accuracy:.2f}%)"
                        f", cosine mean {result.cosine_mean:.4f}")

    outcome = _timed("evaluate", step)
    return holder["report"], outcome


def print_outcome(index: int, total: int, outcome: StepOutcome) -> None:
    state = "reused (inputs unchanged)" if outcome.reused else f"done in {outcome.seconds:.1f} s"
    print(f"[{index}/{total}] {outcome.step:9s} {state}: {outcome.summary}", flush=True)


def run(args: argparse.Namespace) -> int:
    from builder.cli.oneshot import pipeline_from_args

    return pipeline_from_args(args)
