"""Scale-out stage: the task bodies of a sweep (quantize one recipe, build one engine, evaluate one model).

Each function takes and returns plain values (bytes, frozen artifacts), writes nothing outside a temporary
folder of its own and runs the library pipeline, so the same body runs in-process and in a Ray worker on
another machine; the driver (builder.distributed.sweep) writes what they return into the output folder.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from builder.backends.options import BuildOptions
    from builder.engine.manifest import EngineManifest
    from builder.evaluate.evaluate import EvalData, Reference
    from builder.evaluate.report import AccuracyReport
    from builder.graph.report import GraphReport
    from calib.statistics import Statistics

Feed = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class QuantizedFiles:
    """What quantizing one recipe produced, as the files of its folder (``model.onnx`` and its side files)."""

    recipe: str
    model: bytes
    plan_json: str
    recipe_yaml: str
    precision: dict[str, Any]
    int8_gemm_flop_share: float
    summary: str


@dataclass(frozen=True, kw_only=True)
class BuiltEngine:
    """A built engine (manifest + plan), or ``reused`` when the existing one was made from the same inputs."""

    manifest: EngineManifest
    plan: bytes | None  # None when reused
    reused: bool


def quantize_recipe(model: bytes, report: GraphReport, recipe: str, fallbacks: tuple[str, ...],
                    statistics: Statistics, variant: str, feeds: list[Feed] | None) -> QuantizedFiles:
    """Plan, quantize the weights and lower ``model`` under ``recipe`` from the shared Statistics."""
    import onnx

    from builder.cli.steps import quantize_summary
    from builder.pipeline import quantize, resolve_recipe
    from builder.recipes.loader import recipe_to_yaml
    from builder.weights.hessians import recipe_needs_data

    proto = onnx.load_from_string(model)
    resolved = resolve_recipe(recipe, report, fallbacks)
    result = quantize(proto, report, resolved, statistics, variant=variant,
                      feeds=feeds if recipe_needs_data(resolved) else None)
    return QuantizedFiles(recipe=resolved.name, model=result.model.serialize(), plan_json=result.plan.to_json(),
                          recipe_yaml=recipe_to_yaml(resolved), precision=dict(result.model.precision),
                          int8_gemm_flop_share=result.plan.int8_gemm_flop_share,
                          summary=quantize_summary(result, variant))


def build_one(files: QuantizedFiles, ranges_json: str, options: BuildOptions, name: str,
              existing: EngineManifest | None = None) -> BuiltEngine:
    """Build one engine from the quantized files (or report ``existing`` reusable: same inputs and backend)."""
    import onnx

    from builder.backends.select import select_backend
    from builder.engine.build import MODEL_FILE, RANGES_FILE, RECIPE_FILE, BuildInputs, build_engine, engine_input_hash

    with tempfile.TemporaryDirectory(prefix="build-engine-sweep-") as tmp:
        folder = Path(tmp)
        (folder / MODEL_FILE).write_bytes(files.model)
        (folder / RECIPE_FILE).write_text(files.recipe_yaml, encoding="utf-8")
        (folder / RANGES_FILE).write_text(ranges_json, encoding="utf-8")
        backend = select_backend(options.backend)
        inputs = BuildInputs.beside(folder / MODEL_FILE)
        if existing is not None and existing.input_hash == engine_input_hash(
                backend, inputs, onnx.load_from_string(files.model), options):
            return BuiltEngine(manifest=existing, plan=None, reused=True)
        artifact = build_engine(inputs, options, name=name, backend=backend)
    return BuiltEngine(manifest=artifact.manifest, plan=artifact.plan, reused=False)


def evaluate_model(fp32: bytes, files: QuantizedFiles, report: GraphReport, data: EvalData,
                   reference: Reference) -> AccuracyReport:
    """The accuracy of the quantized model against the FP32 reference (computed once by the driver)."""
    import onnx

    from builder.evaluate.evaluate import evaluate

    return evaluate(onnx.load_from_string(fp32), onnx.load_from_string(files.model), report, data, reference,
                    name=files.recipe)
