"""Scale-out stage: the build matrix -- every (recipe, backend, architecture, profile) from one calibration.

    calibrate once (sharded on Ray with --ray)           -> <out>/calibration/statistics.npz
    quantize each recipe from the same Statistics        -> <out>/<recipe>/model.onnx, plan.json, ranges.json
    build each (recipe, backend, arch, profile)          -> <out>/<recipe>/<backend>-<arch>-b..-s../
    evaluate each recipe against FP32 (optional)         -> <out>/<recipe>/report.json
    one table and a Pareto plot                          -> <out>/sweep.json, sweep.md, pareto.png

Tasks are routed by Ray resources: a TensorRT-RTX build compiles ahead of time on any CPU (``num_cpus=1``);
a full-TensorRT build must run on the GPU model it targets, so it asks for one GPU and one unit of the custom
resource ``tensorrt-<arch>`` that nodes with such a GPU declare (``ray start --num-gpus 1 --resources
'{"tensorrt-sm89": 1}'``); the sweep refuses to start when no node offers it. Without ``--ray`` the same task
bodies run in this process. Every task returns its artifact and the driver writes it, so workers need no
shared file system; an engine whose inputs and backend version are unchanged is reused.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.backends.options import BackendName, BuildOptions, ShapeProfile
from builder.distributed.executor import Executor, Resources, executor
from builder.distributed.sweep_report import SweepReport, SweepRow, write_report
from builder.distributed.tasks import BuiltEngine, QuantizedFiles, build_one, evaluate_model, quantize_recipe
from calib.errors import ConfigError

if TYPE_CHECKING:
    from builder.cli.steps import CalibSettings
    from builder.evaluate.report import AccuracyReport
    from calib.statistics import Statistics

logger = logging.getLogger(__name__)

CALIBRATION_DIR = "calibration"


@dataclass(frozen=True, kw_only=True)
class SweepTask:
    """One engine of the matrix."""

    recipe: str
    backend: BackendName
    architecture: str
    profile: ShapeProfile

    @property
    def name(self) -> str:
        b, s = self.profile.batch, self.profile.seq
        return f"{self.backend.value}-{self.architecture}-b{b.min}-{b.opt}-{b.max}-s{s.min}-{s.opt}-{s.max}"

    def options(self, base: BuildOptions) -> BuildOptions:
        import msgspec

        return msgspec.structs.replace(base, backend=self.backend, architectures=(self.architecture,),
                                       profiles=(self.profile,))

    @property
    def resources(self) -> Resources:
        if self.backend == BackendName.TENSORRT:  # built on the GPU model it will run on
            return Resources(cpus=1, gpus=1, custom={f"tensorrt-{self.architecture}": 1})
        return Resources(cpus=1)  # TensorRT-RTX: ahead of time on any CPU


@dataclass(frozen=True, kw_only=True)
class SweepRequest:
    """The matrix and where it goes."""

    model_path: Path
    folder: Path
    recipes: tuple[str, ...]
    backends: tuple[BackendName, ...]
    architectures: tuple[str, ...]
    profiles: tuple[ShapeProfile, ...]
    options: BuildOptions  # everything else of the builds (optimization level, workspace, ...)
    calibration: CalibSettings
    variant: str = "portable"
    address: str | None = None  # --ray
    shards: int | None = None
    evaluate: bool = True
    eval_train: int | None = None
    eval_test: int | None = None
    fresh: bool = False
    progress: bool = True

    def tasks(self) -> list[SweepTask]:
        return [SweepTask(recipe=r, backend=b, architecture=a, profile=p)
                for r, b, a, p in itertools.product(self.recipes, self.backends, self.architectures, self.profiles)]


def check_request(request: SweepRequest) -> None:
    """Refuse what cannot run before any work (exit 2)."""
    if not request.recipes or not request.architectures or not request.profiles or not request.backends:
        raise ConfigError("a sweep needs at least one recipe, backend, architecture and profile")
    if BackendName.AUTO in request.backends:
        raise ConfigError("--backends takes tensorrt and/or tensorrt-rtx (a sweep routes each explicitly), not auto")
    for task in request.tasks():
        task.options(request.options)  # validates architectures against the backend's rules where it can


def _calibrate(request: SweepRequest, prepared: Any, report: Any, encoder: Any) -> Statistics:
    from builder.cli.steps import collect_statistics
    from builder.distributed.ray_calibrate import ShardConfig, calibrate_sharded
    from builder.pipeline import calibration_tensors

    folder = request.folder / CALIBRATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors = calibration_tensors(prepared.model, report)
    source = prepared.model if prepared.rewritten else request.model_path
    if request.address is not None or request.shards is not None:
        config = ShardConfig(shards=request.shards, address=request.address)
        result = calibrate_sharded(source, tensors, request.calibration, folder, encoder, config,
                                   fresh=request.fresh, progress=request.progress)
    else:
        result = collect_statistics(source, tensors, request.calibration, folder, encoder, fresh=request.fresh,
                                    progress=request.progress)
    return result.statistics


def _existing(engine_dir: Path) -> Any:
    """The manifest of an intact engine in ``engine_dir`` (plan present with its recorded hash), else None."""
    from builder.engine.manifest import MANIFEST_FILE, read_manifest
    from calib.artifact_io import sha256_file

    if not (engine_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = read_manifest(engine_dir)
    except ConfigError:
        return None
    plan = engine_dir / manifest.plan_file
    return manifest if plan.is_file() and sha256_file(plan) == manifest.plan_sha256 else None


def _write_recipe(folder: Path, files: QuantizedFiles) -> None:
    from builder.engine.build import MODEL_FILE, RECIPE_FILE
    from calib.artifact_io import atomic_write_bytes, atomic_write_json, atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / MODEL_FILE
    if not (model.is_file() and model.read_bytes() == files.model):  # deterministic: unchanged bytes stay put
        atomic_write_bytes(model, files.model)
    atomic_write_text(folder / "plan.json", files.plan_json)
    atomic_write_text(folder / RECIPE_FILE, files.recipe_yaml)
    atomic_write_json(folder / "precision.json", files.precision)


def _write_engine(built: BuiltEngine, recipe_dir: Path, engine_dir: Path) -> None:
    from builder.engine.build import MODEL_FILE, BuildInputs, write_engine
    from builder.engine.manifest import EngineArtifact

    if built.reused:
        return
    assert built.plan is not None
    write_engine(EngineArtifact(manifest=built.manifest, plan=built.plan), BuildInputs.beside(recipe_dir / MODEL_FILE),
                 engine_dir)


def run_sweep(request: SweepRequest) -> SweepReport:
    """Calibrate once, then quantize, build and evaluate every task of the matrix; write the table and plot."""
    from builder.engine.build import check_profiles_for
    from builder.intake.prepare import prepare_model
    from builder.pipeline import analyze_model, resolve_recipe

    check_request(request)
    prepared = prepare_model(request.model_path)
    for task in request.tasks():  # shape profiles the graph cannot take (a KV cache without --past): before any work
        check_profiles_for(prepared.model, task.options(request.options))
    report = analyze_model(prepared.model, request.model_path.stem)
    for recipe in request.recipes:
        resolve_recipe(recipe, report)  # a bad recipe fails before calibration
    encoder = request.calibration.encoder(request.model_path)
    with executor(request.address) as pool:
        _check_routing(pool, request)  # before any work: a task no node can take would wait forever
        statistics = _calibrate(request, prepared, report, encoder)
        return _run_tasks(pool, request, prepared, report, statistics, encoder)


def _check_routing(pool: Executor, request: SweepRequest) -> None:
    from builder.distributed.cluster import require_resources
    from builder.distributed.executor import OnRay

    if not isinstance(pool, OnRay):
        return
    for task in request.tasks():
        needed = {"CPU": task.resources.cpus, "GPU": task.resources.gpus, **(task.resources.custom or {})}
        require_resources(pool.ray, {k: v for k, v in needed.items() if v}, f"the {task.name} build")


def _run_tasks(pool: Executor, request: SweepRequest, prepared: Any, report: Any, statistics: Statistics,
               encoder: Any) -> SweepReport:
    from builder.cli.steps import calibration_feeds, write_ranges
    from calib.cache import tensorrt_header
    from calib.range_table import RangeMethod
    from calib.ranges import RangeSpec, range_table

    model_bytes = prepared.model.SerializeToString()
    shared = {"model": pool.put(model_bytes), "report": pool.put(report), "statistics": pool.put(statistics)}
    feeds = calibration_feeds(request.calibration, encoder)
    quantized = {r: pool.submit(quantize_recipe, shared["model"], shared["report"], r, (), shared["statistics"],
                                request.variant, feeds, resources=Resources(cpus=1)) for r in request.recipes}
    ranges_json = range_table(statistics, RangeSpec(method=RangeMethod.MAX),
                              model_name=request.model_path.stem).to_json()
    folders = {r: request.folder / r for r in request.recipes}
    builds = {t: pool.submit(build_one, quantized[t.recipe], ranges_json, t.options(request.options), t.name,
                             _existing(folders[t.recipe] / t.name), resources=t.resources)
              for t in request.tasks()}
    accuracy = _evaluate(pool, request, shared, quantized, report, encoder)
    files: dict[str, QuantizedFiles] = {}
    for recipe, handle in quantized.items():
        files[recipe] = pool.get(handle)
        _write_recipe(folders[recipe], files[recipe])
        write_ranges(statistics, RangeSpec(method=RangeMethod.MAX), folders[recipe],
                     model_name=request.model_path.stem, header=tensorrt_header("10.3.0"))
    rows = []
    for task, handle in builds.items():
        built: BuiltEngine = pool.get(handle)
        _write_engine(built, folders[task.recipe], folders[task.recipe] / task.name)
        scores = accuracy.get(task.recipe)
        rows.append(_row(task, built, files[task.recipe], scores))
        if request.progress:
            state = "reused" if built.reused else f"built in {built.manifest.build_time_s:.1f} s"
            print(f"{task.recipe} {task.name}: {state}", flush=True)
    for recipe, result in accuracy.items():
        if result is not None:
            from calib.artifact_io import atomic_write_text

            atomic_write_text(folders[recipe] / "report.json", result.to_json())
    sweep = SweepReport(model=request.model_path.name, calibration=f"{CALIBRATION_DIR}/statistics.npz",
                        rows=tuple(rows))
    write_report(sweep, request.folder)
    return sweep


def _evaluate(pool: Executor, request: SweepRequest, shared: dict[str, Any], quantized: dict[str, Any],
              report: Any, encoder: Any) -> dict[str, AccuracyReport | None]:
    """Accuracy of each recipe's model (one task per recipe; the FP32 reference is computed once, here)."""
    if not request.evaluate:
        return {}
    from builder.cli.oneshot import evaluation_data

    data, reference = evaluation_data(request.eval_train, request.eval_test, request.calibration.seed,
                                      request.model_path, encoder, cache_dir=request.folder / "eval-cache",
                                      progress=request.progress)
    refs = (pool.put(data), pool.put(reference))
    handles = {r: pool.submit(evaluate_model, shared["model"], quantized[r], shared["report"], *refs,
                              resources=Resources(cpus=1)) for r in request.recipes}
    return {r: pool.get(h) for r, h in handles.items()}


def _row(task: SweepTask, built: BuiltEngine, files: QuantizedFiles, scores: AccuracyReport | None) -> SweepRow:
    m = built.manifest
    return SweepRow(recipe=task.recipe, backend=m.backend, backend_version=m.backend_version,
                    architecture=task.architecture, profile=task.profile, engine_dir=f"{task.recipe}/{task.name}",
                    plan_bytes=m.plan_bytes, build_time_s=m.build_time_s, reused=built.reused,
                    int8_gemm_flop_share=files.int8_gemm_flop_share,
                    cosine_mean=None if scores is None else scores.cosine_mean,
                    probe_accuracy=None if scores is None else scores.probe_accuracy)
