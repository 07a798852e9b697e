"""Engine-build stage: the EngineArtifact (serialized plan + manifest) and ``manifest.json``.

The manifest records what decided the engine (tool version, recipe and range-table hashes, backend and its
version, target architectures, plugins with versions, I/O tensors, optimization profiles, build options and
time) and ``input_hash``, the key a re-run compares to reuse an unchanged engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.backends.base import TensorSpec
from builder.backends.options import BuildOptions
from calib.artifact_io import canonical_json, versioned_object
from calib.errors import ConfigError

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True, kw_only=True)
class PluginRecord:
    """A plugin the engine needs at run time: op (domain::type), version, and where it came from."""

    op: str
    version: str
    source: str | None = None  # library path or Python module that registers it
    source_sha256: str | None = None  # of a library file

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "version": self.version, "source": self.source, "source_sha256": self.source_sha256}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PluginRecord:
        return cls(
            op=str(data["op"]),
            version=str(data["version"]),
            source=data.get("source"),
            source_sha256=data.get("source_sha256"),
        )


@dataclass(frozen=True, kw_only=True)
class EngineManifest:
    """Everything needed to trust, reuse, serve and profile one engine."""

    name: str
    tool_version: str
    backend: str
    backend_version: str
    architectures: tuple[str, ...]
    plan_file: str
    plan_sha256: str
    plan_bytes: int
    model_file: str
    model_sha256: str
    recipe_name: str | None
    recipe_sha256: str | None
    ranges_sha256: str | None
    calibration_cache_sha256: str | None
    plugins: tuple[PluginRecord, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Mapping[str, Mapping[str, list[int]]], ...]  # per profile: input -> min/opt/max shape
    options: BuildOptions
    build_time_s: float
    input_hash: str
    version: int = field(default=MANIFEST_VERSION)

    def to_json(self) -> str:
        data = {
            "version": self.version,
            "name": self.name,
            "tool_version": self.tool_version,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "architectures": list(self.architectures),
            "plan_file": self.plan_file,
            "plan_sha256": self.plan_sha256,
            "plan_bytes": self.plan_bytes,
            "model_file": self.model_file,
            "model_sha256": self.model_sha256,
            "recipe_name": self.recipe_name,
            "recipe_sha256": self.recipe_sha256,
            "ranges_sha256": self.ranges_sha256,
            "calibration_cache_sha256": self.calibration_cache_sha256,
            "plugins": [p.to_dict() for p in self.plugins],
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "profiles": [dict(p) for p in self.profiles],
            "options": self.options.to_dict(),
            "build_time_s": self.build_time_s,
            "input_hash": self.input_hash,
        }
        return canonical_json(data)

    @classmethod
    def from_json(cls, text: str) -> EngineManifest:
        data = versioned_object(text, "manifest", MANIFEST_VERSION)
        try:
            return cls(
                name=str(data["name"]),
                tool_version=str(data["tool_version"]),
                backend=str(data["backend"]),
                backend_version=str(data["backend_version"]),
                architectures=tuple(data["architectures"]),
                plan_file=str(data["plan_file"]),
                plan_sha256=str(data["plan_sha256"]),
                plan_bytes=int(data["plan_bytes"]),
                model_file=str(data["model_file"]),
                model_sha256=str(data["model_sha256"]),
                recipe_name=data["recipe_name"],
                recipe_sha256=data["recipe_sha256"],
                ranges_sha256=data["ranges_sha256"],
                calibration_cache_sha256=data["calibration_cache_sha256"],
                plugins=tuple(PluginRecord.from_dict(p) for p in data["plugins"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                profiles=tuple(data["profiles"]),
                options=BuildOptions.from_dict(data["options"]),
                build_time_s=float(data["build_time_s"]),
                input_hash=str(data["input_hash"]),
            )
        except KeyError as exc:
            raise ConfigError(f"manifest lacks the field {exc.args[0]!r}") from None


@dataclass(frozen=True, kw_only=True)
class EngineArtifact:
    """A built engine in memory: the serialized plan and its manifest."""

    manifest: EngineManifest
    plan: bytes = field(repr=False)

    def to_json(self) -> str:
        return self.manifest.to_json()


def read_manifest(engine_dir: Path) -> EngineManifest:
    """The manifest of ``engine_dir``; a clear ConfigError when the folder or its manifest is missing."""
    if not engine_dir.is_dir():
        raise ConfigError(f"engine folder {str(engine_dir)!r} does not exist")
    path = engine_dir / MANIFEST_FILE
    if not path.is_file():
        raise ConfigError(
            f"{str(engine_dir)!r} has no {MANIFEST_FILE}: it is not a built engine (run `build-engine build` first)"
        )
    return EngineManifest.from_json(path.read_text(encoding="utf-8"))
