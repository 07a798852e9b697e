"""manifest.json as a strict schema: its JSON shape, unknown keys at every depth, versions (no backend needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from builder.backends.base import TensorSpec
from builder.backends.options import BackendName, BuildOptions, DimRange, PluginSpec, ShapeProfile, Typing
from builder.engine.manifest import EngineArtifact, EngineManifest, PluginRecord, read_manifest
from calib.errors import ConfigError

OPTIONS = BuildOptions(
    backend=BackendName.TENSORRT, typing=Typing.WEAK, architectures=("sm86",),
    profiles=(ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=8, max=16)),),
    plugins=(PluginSpec(library="/opt/libx.so"),),
)


def manifest() -> EngineManifest:
    return EngineManifest(
        name="toy", tool_version="0.1.0", backend="tensorrt", backend_version="10.9.0",
        architectures=("current",), plan_file="tensorrt.plan", plan_sha256="ab" * 32, plan_bytes=1234,
        model_file="model.onnx", model_sha256="cd" * 32, recipe_name="int8-gemm", recipe_sha256="ef" * 32,
        ranges_sha256=None, calibration_cache_sha256=None,
        plugins=(PluginRecord(op="build_engine::LayerNormQuantize", version="1", source="/opt/libx.so",
                              source_sha256="01" * 32),),
        inputs=(TensorSpec(name="input_ids", dtype="int64", shape=(-1, -1)),),
        outputs=(TensorSpec(name="y", dtype="float32", shape=(-1, -1, 8)),),
        profiles=({"input_ids": {"min": [1, 1], "opt": [2, 8], "max": [4, 16]}},),
        options=OPTIONS, build_time_s=1.25, input_hash="12" * 32,
    )


def test_round_trip_and_json_shape() -> None:
    text = manifest().to_json()
    assert EngineManifest.from_json(text) == manifest()
    assert EngineManifest.from_json(text).to_json() == text
    data = json.loads(text)
    # the keys of manifest version 1, written out independently of the class
    assert sorted(data) == sorted([
        "version", "name", "tool_version", "backend", "backend_version", "architectures", "plan_file",
        "plan_sha256", "plan_bytes", "model_file", "model_sha256", "recipe_name", "recipe_sha256", "ranges_sha256",
        "calibration_cache_sha256", "plugins", "inputs", "outputs", "profiles", "options", "build_time_s",
        "input_hash",
    ])
    assert data["version"] == 1
    assert data["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [-1, -1]}]
    assert data["plugins"] == [{"op": "build_engine::LayerNormQuantize", "version": "1", "source": "/opt/libx.so",
                                "source_sha256": "01" * 32}]
    assert data["profiles"] == [{"input_ids": {"min": [1, 1], "opt": [2, 8], "max": [4, 16]}}]
    assert data["options"]["profiles"] == [{"batch": [1, 2, 4], "seq": [1, 8, 16]}]
    assert text.endswith("}\n") and text == json.dumps(data, sort_keys=True, indent=2) + "\n"


def _with(path: tuple[str | int, ...], key: str, value: Any = 1) -> str:
    data = json.loads(manifest().to_json())
    node = data
    for step in path:
        node = node[step]
    node[key] = value
    return json.dumps(data)


@pytest.mark.parametrize(("path", "key", "message"), [
    ((), "plan_sha265", r"at \$; allowed: name, .*did you mean 'plan_sha256'"),
    (("inputs", 0), "dtpye", r"at \$\.inputs\[0\]; allowed: name, dtype, shape; did you mean 'dtype'"),
    (("plugins", 0), "sources", r"at \$\.plugins\[0\]; allowed: op, version, source, source_sha256"),
    (("options",), "optimisation_level", r"at \$\.options; allowed: .*did you mean 'optimization_level'"),
    (("options", "profiles", 0), "pats", r"at \$\.options\.profiles\[0\]; allowed: batch, seq, past"),
    (("profiles", 0, "input_ids"), "mni", r"at \$\.profiles\[0\]\.input_ids; allowed: min, opt, max; did you mean"),
])
def test_unknown_keys_at_every_depth_are_named(path: tuple[str | int, ...], key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"manifest: unknown key '{key}' {message}") as info:
        EngineManifest.from_json(_with(path, key, [1, 1]))  # a well-typed value: only the key is wrong
    assert info.value.exit_code == 2


def test_missing_and_mistyped_values_are_named() -> None:
    data = json.loads(manifest().to_json())
    del data["input_hash"]
    with pytest.raises(ConfigError, match="input_hash"):
        EngineManifest.from_json(json.dumps(data))
    with pytest.raises(ConfigError, match=r"Expected `int`, got `str` at \$\.plan_bytes"):
        EngineManifest.from_json(_with((), "plan_bytes", "1234"))
    data = json.loads(manifest().to_json())
    del data["profiles"][0]["input_ids"]["opt"]
    with pytest.raises(ConfigError, match=r"\$\.profiles\[0\]\.input_ids lacks 'opt'"):
        EngineManifest.from_json(json.dumps(data))


def test_versions_are_checked_for_the_manifest_and_its_options() -> None:
    with pytest.raises(ConfigError, match="manifest version 2 not supported; expected 1"):
        EngineManifest.from_json(_with((), "version", 2))
    with pytest.raises(ConfigError, match="build options version 7 not supported; expected 1"):
        EngineManifest.from_json(_with(("options",), "version", 7))
    with pytest.raises(ConfigError, match="not valid JSON"):
        EngineManifest.from_json("{")


def test_read_manifest_reads_the_folder(tmp_path: Any) -> None:
    (tmp_path / "manifest.json").write_text(manifest().to_json())
    assert read_manifest(tmp_path) == manifest()
    (tmp_path / "manifest.json").write_text(_with(("inputs", 0), "bogus"))
    with pytest.raises(ConfigError, match="bogus"):
        read_manifest(tmp_path)


def test_artifact_repr_leaves_the_plan_out() -> None:
    artifact = EngineArtifact(manifest=manifest(), plan=b"\0" * 4096)
    assert "<4096 bytes>" in repr(artifact) and "\\x00" not in repr(artifact)
    assert artifact.to_json() == manifest().to_json()
