"""Serving stage: ``export_triton()`` -- an engine folder -> a Triton model repository entry.

Layout (Triton's documented one)::

    <repo>/<model>/config.pbtxt
    <repo>/<model>/1/model.plan
    <repo>/<model>/plugins/<lib>.so      only when the engine needs plugin libraries
    <repo>/<model>_tokenizer/, <repo>/<model>_text/   optional text front end (Python backend + ensemble)

Each entry is assembled in a staging folder next to the repository and renamed into place, so the
repository never holds a half-written model. Export is idempotent: the same engine and options give
"unchanged"; a different model of the same name is refused unless ``force``.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from builder.engine.manifest import EngineManifest, read_manifest
from builder.engine.outputs import check_output_dir
from builder.serve.config import TritonOptions, render_config, validate_config
from builder.serve.ensemble import text_front_end
from calib.artifact_io import sha256_file
from calib.errors import BackendUnavailable, BuildError, ConfigError

logger = logging.getLogger(__name__)

VERSION_DIR = "1"
PLAN_NAME = "model.plan"
CONFIG_NAME = "config.pbtxt"


class ExportStatus(StrEnum):
    WRITTEN = "written"
    UNCHANGED = "unchanged"
    REPLACED = "replaced"


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """Where the model went, what happened, and what the server needs to know (plugin flags)."""

    model_dir: Path
    status: ExportStatus
    config_text: str
    notes: tuple[str, ...] = field(default=())
    extra_models: tuple[str, ...] = field(default=())  # the text front end's models, when exported


def _plugin_notes(manifest: EngineManifest, repo: Path, model: str) -> tuple[list[tuple[Path, str]], list[str]]:
    """(library files to copy, notes) for the engine's plugins."""
    copies: list[tuple[Path, str]] = []
    notes: list[str] = []
    for plugin in manifest.plugins:
        source = plugin.source
        if source is not None and source.endswith(".so"):
            lib = Path(source)
            if not lib.is_file():
                raise ConfigError(f"plugin library {source!r} recorded in the manifest no longer exists")
            copies.append((lib, f"plugins/{lib.name}"))
        else:
            notes.append(
                f"plugin {plugin.op} v{plugin.version} comes from Python module {source!r}: ahead-of-time Quickly "
                "Deployable Plugins are embedded in the plan (TensorRT >= 10.9) and need no library; "
                "Python (JIT) plugins cannot run inside Triton"
            )
    if copies:
        libs = ";".join(str((repo / model / rel).resolve()) for _, rel in copies)
        notes.append(f'start the server with: tritonserver --model-repository={repo.resolve()} '
                     f'--backend-config=tensorrt,plugins="{libs}"')
        notes.append(f"or preload them for every model: LD_PRELOAD={libs.replace(';', ':')} tritonserver ...")
        notes.append("build the plugin libraries against the container's TensorRT version")
    if manifest.backend == "tensorrt-rtx":
        notes.append(
            "this is a TensorRT-RTX plan: Triton's tensorrt_plan backend links full TensorRT and may refuse it; "
            "rebuild with --backend tensorrt for serving"
        )
    return copies, notes


Files = dict[str, bytes | Path]  # relative path -> content, or a file to copy


def _digest(content: bytes | Path) -> str:
    return sha256_file(content) if isinstance(content, Path) else hashlib.sha256(content).hexdigest()


def _existing(model_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(model_dir)): sha256_file(p) for p in sorted(model_dir.rglob("*")) if p.is_file()
    }


def _check_repo(repo: Path) -> None:
    if repo.exists() and not repo.is_dir():
        raise ConfigError(f"model repository {str(repo)!r} is a file, not a folder")
    check_output_dir(repo, parents=True)


def _status(model_dir: Path, files: Files, force: bool) -> ExportStatus:
    """What writing ``files`` to ``model_dir`` would do; a different model there without ``force`` is an error."""
    if not model_dir.exists():
        return ExportStatus.WRITTEN
    if _existing(model_dir) == {rel: _digest(content) for rel, content in files.items()}:
        return ExportStatus.UNCHANGED
    if not force:
        raise ConfigError(
            f"{str(model_dir)!r} already holds a different model named {model_dir.name!r}; "
            "use --force to replace it or --name to export under another name"
        )
    return ExportStatus.REPLACED


def _write(repo: Path, name: str, files: Files) -> None:
    """Assemble ``files`` in a staging folder next to the repository, then move it into place."""
    repo.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".staging", dir=repo.parent))
    try:
        for rel, content in files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
        _commit(staging, repo / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_triton(
    engine_dir: Path,
    repo: Path,
    options: TritonOptions,
    *,
    force: bool = False,
    tokenizer: Path | None = None,
    max_length: int | None = None,
) -> ExportResult:
    """Write (or confirm) ``<repo>/<model>/`` for the engine in ``engine_dir`` (and the text front end)."""
    _check_repo(repo)
    manifest = read_manifest(engine_dir)
    plan = engine_dir / manifest.plan_file
    if not plan.is_file() or sha256_file(plan) != manifest.plan_sha256:
        raise BuildError(f"{str(plan)!r} is missing or differs from its manifest; rebuild the engine")
    config_text = render_config(manifest, options)
    copies, notes = _plugin_notes(manifest, repo, options.model_name)
    entries: dict[str, Files] = {options.model_name: {
        CONFIG_NAME: config_text.encode(), f"{VERSION_DIR}/{PLAN_NAME}": plan, **{rel: lib for lib, rel in copies}
    }}
    if tokenizer is not None:
        entries.update({name: dict(files) for name, files in
                        text_front_end(manifest, options, tokenizer, max_length).entries.items()})
        notes.append(f"clients can send raw text (TEXT, TYPE_STRING) to {options.model_name}_text")
    try:
        for files in entries.values():
            config = files[CONFIG_NAME]
            assert isinstance(config, bytes)
            validate_config(config.decode())
    except BackendUnavailable as exc:
        logger.warning("configs not validated: %s", exc)
    statuses = {name: _status(repo / name, files, force) for name, files in entries.items()}  # all checked first
    for name, files in entries.items():
        if statuses[name] is not ExportStatus.UNCHANGED:
            _write(repo, name, files)
            logger.info("exported %s to %s (%s)", name, repo / name, statuses[name].value)
    return ExportResult(model_dir=repo / options.model_name, status=statuses[options.model_name],
                        config_text=config_text, notes=tuple(notes),
                        extra_models=tuple(n for n in entries if n != options.model_name))


def _commit(staging: Path, model_dir: Path) -> None:
    """Move the staged folder into place; an existing one is moved aside first and removed afterwards."""
    staging.chmod(0o755)
    if not model_dir.exists():
        staging.rename(model_dir)
        return
    trash = model_dir.parent.parent / f".{model_dir.name}.old-{staging.name}"
    model_dir.rename(trash)
    try:
        staging.rename(model_dir)
    except BaseException:
        trash.rename(model_dir)
        raise
    shutil.rmtree(trash, ignore_errors=True)
