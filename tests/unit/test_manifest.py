"""EngineArtifact / manifest.json: round trip, atomic writes, stage reuse, and the `build` subcommand."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.backends.options import BuildOptions
from builder.cli.main import main
from builder.engine.build import BuildInputs, build_engine_dir
from builder.engine.manifest import EngineManifest, read_manifest
from calib.errors import ConfigError
from tests.unit.test_backend_rtx import FAST, HIDDEN, save, toy_qdq_model

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
    out = tmp_path / "plug"
    assert main(["build", str(model_path), "-o", str(out), *CLI_FAST]) == 2
    assert "portable" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("kind", "reason"), [("file", "is a file"), ("missing_parent", "does not exist"),
                                              ("read_only", "not writable")])
def test_build_cli_checks_the_output_folder_before_building(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, reason: str
) -> None:
    import os

    model_path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    out = {"file": tmp_path / "a_file", "missing_parent": tmp_path / "no" / "such" / "engine",
           "read_only": tmp_path / "locked" / "engine"}[kind]
    if kind == "file":
        out.write_text("x")
    if kind == "read_only":
        out.parent.mkdir()
        out.parent.chmod(0o500)
        if os.access(out.parent, os.W_OK):  # root ignores permission bits
            pytest.skip("running as a user that can write anywhere")
    started = time.perf_counter()
    assert main(["build", str(model_path), "-o", str(out), *CLI_FAST]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and reason in err and "Traceback" not in err
    assert time.perf_counter() - started < 5  # refused before the build, not after it
    assert not list(tmp_path.rglob("*.plan"))


def test_build_refuses_a_sequence_beyond_the_position_table(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A BERT-style position lookup (arange buffer sliced to the sequence, Gather from a 512-row table)."""
    model = toy_qdq_model()
    graph = model.graph
    graph.initializer.extend([
        numpy_helper.from_array(np.zeros((512, HIDDEN), np.float32), "embeddings.position_embeddings.weight"),
        numpy_helper.from_array(np.arange(512, dtype=np.int64)[None, :], "position_ids_buffer"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ])
    graph.node.extend([
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Slice", ["x_shape", "one", "two_end"], ["seq_len"], name="seq_len"),
        helper.make_node("Slice", ["position_ids_buffer", "zero", "seq_len", "one"], ["pos_ids"], name="slice_pos"),
        helper.make_node("Gather", ["embeddings.position_embeddings.weight", "pos_ids"], ["pos"], name="pos_gather"),
    ])
    graph.initializer.append(numpy_helper.from_array(np.array([2], np.int64), "two_end"))
    graph.output.append(helper.make_tensor_value_info("pos", TensorProto.FLOAT, [1, "seq", HIDDEN]))
    model_path = save(model, tmp_path / "toy.onnx")
    out = tmp_path / "long"
    assert main(["build", str(model_path), "-o", str(out), *CLI_FAST, "--seq", "1,128,4096"]) == 2
    err = capsys.readouterr().err
    assert "4096" in err and "512 position embeddings" in err and "'pos_gather'" in err
    assert not out.exists()
    assert main(["build", str(model_path), "-o", str(out), *CLI_FAST, "--seq", "1,128,512"]) == 0


def test_build_cli_print_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model_path = save(toy_qdq_model(), tmp_path / "toy.onnx")
    assert main(["build", str(model_path), *CLI_FAST, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["architectures"] == ["sm86"]


def test_check_output_dir_rules(tmp_path: Path) -> None:
    from builder.engine.outputs import check_output_dir

    check_output_dir(tmp_path)  # an existing writable folder
    check_output_dir(tmp_path / "new")  # a new folder in one
    check_output_dir(tmp_path / "a" / "b", parents=True)  # missing parents allowed when asked for
    with pytest.raises(ConfigError, match="does not exist"):
        check_output_dir(tmp_path / "a" / "b")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(tmp_path / "f" / "sub" / "dir", parents=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "new").exists()  # checking never creates
