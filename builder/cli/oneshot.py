"""CLI stage: the one-shot pipeline's driver, shared by ``build-engine model.onnx ...`` and ``demo``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from builder.cli.run import (
    PipelineResult,
    build_step,
    calib_settings,
    calibrate_model,
    evaluate_step,
    print_outcome,
)

if TYPE_CHECKING:
    from builder.backends.options import BuildOptions
    from builder.cli.steps import CalibSettings, StepOutcome
    from builder.evaluate.evaluate import EvalData, Reference
    from calib.calibrate import RangeSpec
    from calib.collect import Collection


@dataclass(frozen=True, kw_only=True)
class PipelineRequest:
    """One pipeline run: the model, where its artifacts go and how each step is done."""

    model_path: Path
    folder: Path
    recipe: str
    fallbacks: tuple[str, ...] = ()
    variant: str = "portable"
    calibration: CalibSettings
    primary: RangeSpec
    build: BuildOptions | None  # None: stop after the Q/DQ ONNX
    fresh: bool = False
    progress: bool = True


def run_pipeline(request: PipelineRequest, *, collection: Collection | None = None,
                 evaluation: tuple[EvalData, Reference] | None = None) -> tuple[PipelineResult, Collection]:
    """Run every step for one recipe; ``collection`` lets several recipes share one calibration pass."""
    import onnx

    from builder.cli.steps import decide_ranges, quantize_step, tensor_labels, write_outliers
    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.lower.quantize import resolve_recipe
    from builder.plan.planner import flagged_layers
    from calib.cache import tensorrt_header

    model: onnx.ModelProto = load_model(request.model_path)
    report = analyze(model, name=request.model_path.stem)
    recipe = resolve_recipe(request.recipe, report, request.fallbacks)  # bad recipes fail before calibration
    total = 3 + (request.build is not None) + (evaluation is not None)
    outcomes: list[StepOutcome] = []

    def show(outcome: StepOutcome) -> None:
        outcomes.append(outcome)
        print_outcome(len(outcomes), total, outcome)

    request.folder.mkdir(parents=True, exist_ok=True)
    if collection is None:
        collection, outcome = calibrate_model(request.model_path, report, request.calibration, request.folder,
                                              fresh=request.fresh, progress=request.progress)
        show(outcome)
    else:
        from builder.cli.steps import StepOutcome

        show(StepOutcome(step="calibrate", reused=True, summary=f"shared collection of {collection.samples} texts",
                         seconds=0.0))
    source = f"{request.calibration.data}:{collection.samples}"
    tables = decide_ranges(collection, recipe, request.primary, request.folder,
                           model_name=request.model_path.stem, data_source=source,
                           header=tensorrt_header("10.3.0"))
    outliers, _ = write_outliers(collection.stats, tensor_labels(report), request.folder,
                                 request.calibration.tokenizer_path())
    flagged = flagged_layers(outliers)
    from builder.cli.steps import StepOutcome

    show(StepOutcome(step="ranges", reused=False, seconds=0.0,
                     summary=f"{len(tables)} range table(s); outlier layers {list(flagged or ())}"))
    outcome, _ = quantize_step(request.model_path, model, report, recipe, tables, flagged, request.variant,
                               request.folder, calibration=request.calibration)
    show(outcome)
    engine = None
    if request.build is not None:
        outcome, engine = build_step(request.folder, request.build)
        show(outcome)
    accuracy = None
    if evaluation is not None:
        accuracy, outcome = evaluate_step(request.model_path, request.folder, report, *evaluation,
                                          name=recipe.name)
        show(outcome)
    result = PipelineResult(folder=request.folder, recipe=recipe.name, outcomes=tuple(outcomes),
                            accuracy=accuracy, engine=engine)
    return result, collection


def primary_spec(args: argparse.Namespace) -> RangeSpec:
    from calib.calibrate import RangeSpec
    from calib.range_table import RangeMethod

    return RangeSpec(method=RangeMethod(args.method), percentile=args.percentile)


def evaluation_data(train: int | None, test: int | None, seed: int, fp32_path: Path) -> tuple[EvalData, Reference]:
    """Evaluation splits (disjoint from calibration) and the FP32 reference embeddings."""
    import onnx

    from builder.evaluate.evaluate import load_eval_data, prepare_reference

    data = load_eval_data(seed=seed, train_limit=train, test_limit=test)
    return data, prepare_reference(onnx.load(str(fp32_path)), data)


def pipeline_from_args(args: argparse.Namespace) -> int:
    from builder.cli.build import build_options
    from builder.evaluate.render import format_accuracy
    from calib.errors import ConfigError

    if not args.model.is_file():
        raise ConfigError(f"model file {str(args.model)!r} does not exist")
    recipe_tag = Path(args.recipe).stem if args.recipe.endswith((".yaml", ".yml")) else args.recipe
    folder: Path = args.output or Path("engines") / f"{args.model.stem}-{recipe_tag}"
    options = None if args.no_build else build_options(args, folder / "model.onnx")
    if args.print_config:
        return _print_config(args, options)
    request = PipelineRequest(model_path=args.model, folder=folder, recipe=args.recipe,
                              fallbacks=tuple(args.fallback), variant=args.variant,
                              calibration=calib_settings(args), primary=primary_spec(args), build=options,
                              fresh=args.fresh, progress=not args.no_progress)
    evaluation = None if args.no_evaluate else evaluation_data(args.eval_train, args.eval_test, args.seed,
                                                              args.model)
    result, _ = run_pipeline(request, evaluation=evaluation)
    if result.accuracy is not None:
        print()
        print(format_accuracy(result.accuracy))
    print(f"\nartifacts in {result.folder}")
    return 0


def _print_config(args: argparse.Namespace, options: BuildOptions | None) -> int:
    import json

    from builder.graph.analyze import analyze
    from builder.graph.load import load_model
    from builder.lower.quantize import resolve_recipe
    from builder.recipes.loader import recipe_to_yaml

    model = load_model(args.model)
    recipe = resolve_recipe(args.recipe, analyze(model, name=args.model.stem), args.fallback)
    print(recipe_to_yaml(recipe), end="")
    if options is not None:
        print("# build options")
        print(json.dumps(options.to_dict(), indent=2, sort_keys=True))
    return 0
