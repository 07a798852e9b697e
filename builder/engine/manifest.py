"""Engine-build stage: the EngineArtifact (serialized plan + manifest) and ``manifest.json``.

The manifest records what decided the engine (tool version, recipe and range-table hashes, backend and its
version, target architectures, plugins with versions, I/O tensors, optimization profiles, build options and
time) and ``input_hash``, the key a re-run compares to reuse an unchanged engine. It is a frozen, versioned
msgspec Schema (calib.schema): decoding rejects unknown keys at any depth and a different ``version``.
"""

from __future__ import annotations

from pathlib import Path

from builder.backends.base import TensorSpec
from builder.backends.options import BuildOptions
from calib.errors import ConfigError, suggest
from calib.schema import Schema, decode_json, to_json

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
PROFILE_KEYS = ("min", "opt", "max")  # the shapes of one input in one optimization profile


class PluginRecord(Schema, frozen=True, kw_only=True):
    """A plugin the engine needs at run time: op (domain::type), version, and where it came from."""

    op: str
    version: str
    source: str | None = None  # library path or Python module that registers it
    source_sha256: str | None = None  # of a library file


class EngineManifest(Schema, frozen=True, kw_only=True):
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
    # per profile: input name -> {"min": shape, "opt": shape, "max": shape}
    profiles: tuple[dict[str, dict[str, list[int]]], ...]
    options: BuildOptions
    build_time_s: float
    input_hash: str
    version: int = MANIFEST_VERSION

    def __post_init__(self) -> None:
        for index, profile in enumerate(self.profiles):
            for name, shapes in profile.items():
                _check_profile_keys(shapes, f"$.profiles[{index}].{name}")

    def to_json(self) -> str:
        """Canonical JSON (sorted keys); :meth:`from_json` reads it back equal."""
        return to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> EngineManifest:
        """Decode a manifest; a wrong version, an unknown key or a bad value raises ConfigError."""
        return decode_json(text, cls, "manifest", version=MANIFEST_VERSION)


def _check_profile_keys(shapes: dict[str, list[int]], where: str) -> None:
    for key in shapes:
        if key not in PROFILE_KEYS:
            raise ConfigError(f"manifest: unknown key {key!r} at {where}; allowed: {', '.join(PROFILE_KEYS)}"
                              f"{suggest(key, PROFILE_KEYS)}")
    missing = [k for k in PROFILE_KEYS if k not in shapes]
    if missing:
        raise ConfigError(f"manifest: {where} lacks {', '.join(repr(k) for k in missing)}; "
                          f"each input needs {', '.join(PROFILE_KEYS)}")


class EngineArtifact(Schema, frozen=True, kw_only=True):
    """A built engine in memory: the serialized plan and its manifest (only the manifest is JSON)."""

    manifest: EngineManifest
    plan: bytes

    def __repr__(self) -> str:  # the plan is tens of MiB
        return f"EngineArtifact(manifest={self.manifest!r}, plan=<{len(self.plan)} bytes>)"

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
    return EngineManifest.from_json(path.read_bytes())
