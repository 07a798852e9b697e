"""EngineArtifact / manifest.json: round trip, atomic writes, stage reuse, and the `build` subcommand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.backends.options import BuildOptions
from builder.cli.main import main
from builder.engine.build import BuildInputs, build_engine_dir
from builder.engine.manifest import EngineManifest, read_manifest
from calib.errors import ConfigError
from tests.unit.test_backend_rtx import FAST, save, toy_qdq_model

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (build-engine[rtx]) is not installed")

CLI_FAST = ["--backend", "tensorrt-rtx", "--arch", "sm86", "--opt-level", "0", "--batch", "1,2,4", "--seq", "1,8,16"]


def test_manifest_round_trips_and_records_inputs(tmp_path: Path) -> None:
    engine_dir = tmp_path / "engines" / "toy"
    model_path = save(toy_qdq_model(), engine_dir / "model.onnx")
    (engine_dir / "recipe.yaml").write_text("name: int8-gemm\nrules: []\n")
    (engine_dir / "ranges.json").write_text("{}\n")
    outcome = build_engine_dir(BuildInputs.beside(model_path), FAST, engine_dir)
    text = (engine_dir / "manifest.json").read_text()
    manifest = EngineManifest.from_json(text)
    assert manifest == outcome.manifest
    assert manifest.to_json() == text
    assert manifest.recipe_name == "int8-gemm" and manifest.recipe_sha256 is not None
    assert manifest.ranges_sha256 is not None
    assert manifest.options == FAST
    assert manifest.build_time_s > 0
    assert outcome.plan_path.stat().st_size == manifest.plan_bytes
    assert sorted(p.name for p in engine_dir.iterdir()) == [
        "manifest.json", "model.onnx", "ranges.json", "recipe.yaml", "tensorrt_rtx.plan"
    ]


def test_unchanged_inputs_reuse_the_engine_and_changes_rebuild(tmp_path: Path) -> None:
    model_path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    engine_dir = tmp_path / "engines" / "toy"
    first = build_engine_dir(BuildInputs(model_path=model_path), FAST, engine_dir)
    plan_mtime = first.plan_path.stat().st_mtime_ns
    second = build_engine_dir(BuildInputs(model_path=model_path), FAST, engine_dir)
    assert not first.reused and second.reused
    assert second.plan_path.stat().st_mtime_ns == plan_mtime
    changed = BuildOptions.from_dict({**FAST.to_dict(), "optimization_level": 1})
    third = build_engine_dir(BuildInputs(model_path=model_path), changed, engine_dir)
    assert not third.reused and third.manifest.input_hash != first.manifest.input_hash
    # a damaged plan is never reused
    third.plan_path.write_bytes(b"truncated")
    assert not build_engine_dir(BuildInputs(model_path=model_path), changed, engine_dir).reused


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"no manifest\.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ConfigError, match="version 99"):
        read_manifest(tmp_path)


def test_build_cli_builds_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine_dir = tmp_path / "engines" / "toy"
    save(toy_qdq_model(), engine_dir / "model.onnx")
    assert main(["build", str(engine_dir), *CLI_FAST]) == 0
    assert "built" in capsys.readouterr().out
    assert main(["build", str(engine_dir), *CLI_FAST]) == 0
    assert "reusing engine" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--backend", "tensorrt_rtx"], 2, "did you mean"),
        (["--arch", "sm90"], 2, "unknown GPU architecture"),
        (["--batch", "8,1,1"], 2, "min <= opt <= max"),
    ],
)
def test_build_cli_bad_input_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: int, message: str
) -> None:
    model_path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    out = tmp_path / "engines" / "bad"
    assert main(["build", str(model_path), "-o", str(out), *CLI_FAST, *extra]) == code
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_build_cli_plugin_variant_on_rtx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path = save(toy_qdq_model(plugin=True), tmp_path / "toy.onnx")
    out = tmp_path / "engines" / "plug"
    assert main(["build", str(model_path), "-o", str(out), *CLI_FAST]) == 2
    assert "portable" in capsys.readouterr().err
    assert not out.exists()


def test_build_cli_print_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model_path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    assert main(["build", str(model_path), *CLI_FAST, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["architectures"] == ["sm86"]
