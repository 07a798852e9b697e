"""Engine-build stage: ``build_engine()`` -> EngineArtifact, and writing it into ``engines/<name>/``.

Order of work: validate everything (graph, external data, Q/DQ ranges, options against the backend), then
parse, configure, build and serialize. Files are written only after a successful build, each atomically,
the manifest last: an interrupted or failed build leaves the folder as it was. A re-run whose inputs hash
to the manifest's ``input_hash`` (and whose plan file is intact) reuses the engine instead of rebuilding.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from builder import __version__
from builder.backends.base import EngineBackend
from builder.backends.dims import check_profiles, input_dim_roles
from builder.backends.options import BuildOptions
from builder.backends.select import select_backend
from builder.backends.trt_api import profile_shapes
from builder.engine.manifest import MANIFEST_FILE, EngineArtifact, EngineManifest, PluginRecord, read_manifest
from builder.engine.outputs import check_output_dir
from builder.engine.validate import (
    check_integer_constants,
    check_position_range,
    check_qdq,
    external_data_files,
    load_model_for_build,
)
from calib.artifact_io import atomic_write_bytes, atomic_write_text, canonical_json, sha256_file, sha256_text
from calib.errors import ConfigError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
RECIPE_FILE = "recipe.yaml"
RANGES_FILE = "ranges.json"


@dataclass(frozen=True, kw_only=True)
class BuildInputs:
    """The graph and the side files that describe it (hashed into the manifest and the reuse key)."""

    model_path: Path
    recipe_path: Path | None = None
    ranges_path: Path | None = None

    @classmethod
    def beside(cls, model_path: Path) -> BuildInputs:
        """Pick up ``recipe.yaml`` and ``ranges.json`` lying next to the model (an ``engines/<name>/`` folder)."""
        recipe = model_path.parent / RECIPE_FILE
        ranges = model_path.parent / RANGES_FILE
        return cls(
            model_path=model_path,
            recipe_path=recipe if recipe.is_file() else None,
            ranges_path=ranges if ranges.is_file() else None,
        )


@dataclass(frozen=True, kw_only=True)
class BuildOutcome:
    """What :func:`build_engine_dir` did: the manifest, and whether an existing engine was reused."""

    manifest: EngineManifest
    engine_dir: Path
    reused: bool

    @property
    def plan_path(self) -> Path:
        return self.engine_dir / self.manifest.plan_file


@functools.lru_cache(maxsize=64)
def _cached_sha(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))


def _file_sha(path: Path) -> str:
    """SHA-256 of a file, computed once per (path, mtime, size): models are hashed several times per build."""
    stat = path.stat()
    return _cached_sha(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _optional_sha(path: Path | None) -> str | None:
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"file {str(path)!r} does not exist")
    return _file_sha(path)


def _recipe_name(path: Path | None) -> str | None:
    if path is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {exc}") from exc
    name = data.get("name") if isinstance(data, dict) else None
    return str(name) if name is not None else path.stem


def _plugin_records(model: onnx.ModelProto, options: BuildOptions) -> tuple[PluginRecord, ...]:
    sources = [(p.library or p.module, _optional_sha(Path(p.library)) if p.library else None) for p in options.plugins]
    source, source_sha = sources[0] if len(sources) == 1 else (None, None)
    records: dict[str, PluginRecord] = {}
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx", "ai.onnx.ml"):
            continue
        version = next((a.s.decode() for a in node.attribute if a.name == "plugin_version"), "1")
        namespace = next((a.s.decode() for a in node.attribute if a.name == "plugin_namespace"), "") or node.domain
        op = f"{namespace}::{node.op_type}"  # the registered plugin TensorRT looks up
        records[op] = PluginRecord(op=op, version=version, source=source, source_sha256=source_sha)
    return tuple(records[k] for k in sorted(records))


def engine_input_hash(backend: EngineBackend, inputs: BuildInputs, model: onnx.ModelProto,
                      options: BuildOptions) -> str:
    """The reuse key of an engine: tool and backend versions, the contents of every input file (model, external
    data, recipe, ranges, calibration cache, plugin libraries) and the options (``manifest.input_hash``)."""
    key = {
        "tool_version": __version__,
        "backend": backend.name.value,
        "backend_version": backend.version(),
        "model_sha256": _file_sha(inputs.model_path),
        "external_data": [_file_sha(p) for p in external_data_files(model, inputs.model_path)],
        "recipe_sha256": _optional_sha(inputs.recipe_path),
        "ranges_sha256": _optional_sha(inputs.ranges_path),
        "calibration_cache_sha256": _optional_sha(Path(options.calibration_cache))
        if options.calibration_cache
        else None,
        "plugin_libraries": [_optional_sha(Path(p.library)) for p in options.plugins if p.library],
        "options": options.to_dict(),
    }
    return sha256_text(canonical_json(key))


def check_profiles_for(model: onnx.ModelProto, options: BuildOptions) -> dict[str, tuple[str | None, ...]]:
    """Each input axis's profile dimension, after refusing profiles the graph cannot take (exit 2): a KV cache
    without ``--past`` (or ``--past`` without one), and positions beyond the model's position table."""
    roles = input_dim_roles(model)
    check_profiles(roles, options.profiles)
    for profile in options.profiles:
        past = profile.past.max if profile.past is not None else 0
        what = f"the profile's maximum sequence ({profile.seq.max}" + (f" + past {past})" if past else ")")
        check_position_range(model, profile.seq.max + past, what)
    return roles


def build_engine(
    inputs: BuildInputs, options: BuildOptions, *, name: str, backend: EngineBackend | None = None
) -> EngineArtifact:
    """Validate, then build one engine in memory. Raises ConfigError/BuildError/BackendUnavailable."""
    model = load_model_for_build(inputs.model_path)
    roles = check_profiles_for(model, options)
    check_integer_constants(model)
    qdq_nodes = check_qdq(model)
    chosen = backend if backend is not None else select_backend(options.backend)
    chosen.check(model, options)
    input_hash = engine_input_hash(chosen, inputs, model, options)
    logger.info("building %s with %s %s (%d Q/DQ nodes)", name, chosen.name.value, chosen.version(), qdq_nodes)
    start = time.perf_counter()
    parsed = chosen.parse(inputs.model_path, options)
    parsed.dim_roles = roles
    profiles = tuple(
        {spec.name: dict(zip(("min", "opt", "max"), map(list, profile_shapes(spec, p, roles)), strict=True))
         for spec in parsed.inputs}
        for p in options.profiles
    ) if any(-1 in s.shape for s in parsed.inputs) else ()
    config = chosen.configure(parsed, options)
    plan = chosen.serialize(chosen.build(parsed, config))
    build_time_s = time.perf_counter() - start
    logger.info("built %s in %.2f s (%d bytes)", name, build_time_s, len(plan))
    manifest = EngineManifest(
        name=name,
        tool_version=__version__,
        backend=chosen.name.value,
        backend_version=chosen.version(),
        architectures=chosen.targets(options),
        plan_file=f"{chosen.name.value.replace('-', '_')}.plan",
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        plan_bytes=len(plan),
        model_file=MODEL_FILE,
        model_sha256=_file_sha(inputs.model_path),
        recipe_name=_recipe_name(inputs.recipe_path),
        recipe_sha256=_optional_sha(inputs.recipe_path),
        ranges_sha256=_optional_sha(inputs.ranges_path),
        calibration_cache_sha256=_optional_sha(Path(options.calibration_cache)) if options.calibration_cache else None,
        plugins=_plugin_records(model, options),
        inputs=parsed.inputs,
        outputs=parsed.outputs,
        profiles=profiles,
        options=options,
        build_time_s=round(build_time_s, 3),
        input_hash=input_hash,
    )
    return EngineArtifact(manifest=manifest, plan=plan)


def _reusable(engine_dir: Path, input_hash: str) -> EngineManifest | None:
    if not (engine_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = read_manifest(engine_dir)
    except ConfigError as exc:
        logger.info("existing manifest in %s is unreadable (%s); rebuilding", engine_dir, exc)
        return None
    plan = engine_dir / manifest.plan_file
    if manifest.input_hash != input_hash or not plan.is_file() or sha256_file(plan) != manifest.plan_sha256:
        return None
    return manifest


def write_engine(artifact: EngineArtifact, inputs: BuildInputs, engine_dir: Path) -> None:
    """Write plan, model copy (with its external data) and manifest (last) atomically into ``engine_dir``."""
    if engine_dir.exists() and not engine_dir.is_dir():
        raise ConfigError(f"engine output {str(engine_dir)!r} exists and is not a folder")
    atomic_write_bytes(engine_dir / artifact.manifest.plan_file, artifact.plan)
    target = engine_dir / MODEL_FILE
    if not (target.exists() and target.resolve() == inputs.model_path.resolve()):
        model = onnx.load(str(inputs.model_path), load_external_data=False)
        for data_file in external_data_files(model, inputs.model_path):
            tmp = engine_dir / f".{data_file.name}.tmp"
            shutil.copyfile(data_file, tmp)
            tmp.replace(engine_dir / data_file.name)
        atomic_write_bytes(target, inputs.model_path.read_bytes())
    atomic_write_text(engine_dir / MANIFEST_FILE, artifact.manifest.to_json())


def build_engine_dir(
    inputs: BuildInputs, options: BuildOptions, engine_dir: Path, *, force: bool = False
) -> BuildOutcome:
    """Build into ``engine_dir`` (name = folder name), or reuse the engine there if its inputs are unchanged."""
    check_output_dir(engine_dir, parents=True)
    model = load_model_for_build(inputs.model_path)
    check_profiles_for(model, options)
    backend = select_backend(options.backend)
    if not force:
        reused = _reusable(engine_dir, engine_input_hash(backend, inputs, model, options))
        if reused is not None:
            logger.info("engine %s is up to date; reusing it", engine_dir)
            return BuildOutcome(manifest=reused, engine_dir=engine_dir, reused=True)
    artifact = build_engine(inputs, options, name=engine_dir.name, backend=backend)
    write_engine(artifact, inputs, engine_dir)
    return BuildOutcome(manifest=artifact.manifest, engine_dir=engine_dir, reused=False)
