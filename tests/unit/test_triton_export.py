"""Triton export: configs from real (toy) TensorRT-RTX engines, golden files, protobuf validation, layout."""

from __future__ import annotations

from pathlib import Path

import msgspec
import onnx
import pytest
from onnx import TensorProto, helper

from builder.backends.base import TensorSpec
from builder.cli.main import main
from builder.engine.build import BuildInputs, build_engine_dir
from builder.engine.manifest import MANIFEST_FILE, EngineManifest, PluginRecord, read_manifest
from builder.serve.config import TritonOptions, render_config, validate_config
from builder.serve.export import ExportStatus, export_triton
from calib.errors import ConfigError
from tests.unit.test_backend_rtx import FAST, save, toy_qdq_model

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (build-engine[rtx]) is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient (build-engine[serve]) is not installed")

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    out = {}
    for kind, dynamic in (("dynamic", True), ("fixed", False)):
        model = save(toy_qdq_model(dynamic=dynamic), root / "src" / f"{kind}.onnx")
        out[kind] = build_engine_dir(BuildInputs(model_path=model), FAST, root / f"toy_{kind}").engine_dir
    return out


@pytest.mark.parametrize("kind", ["dynamic", "fixed"])
def test_config_matches_golden_and_parses(engines: dict[str, Path], kind: str) -> None:
    manifest = read_manifest(engines[kind])
    text = render_config(manifest, TritonOptions(model_name=f"toy_{kind}", instances=2))
    assert text == (GOLDEN / f"triton_{kind}.pbtxt").read_text()
    validate_config(text)


def test_validation_rejects_unknown_fields_and_enums() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        validate_config('name: "x"\nbogus_field: 1\n')
    with pytest.raises(ConfigError):
        validate_config('name: "x"\ninput [ { name: "a" data_type: TYPE_FLOAT32 dims: [ 1 ] } ]\n')


def test_export_layout_idempotence_and_force(engines: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "model_repository"
    options = TritonOptions(model_name="toy", max_batch=4, instances=2)
    first = export_triton(engines["dynamic"], repo, options)
    assert first.status is ExportStatus.WRITTEN
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()) == [
        "toy/1/model.plan", "toy/config.pbtxt"
    ]
    manifest = read_manifest(engines["dynamic"])
    assert (repo / "toy/1/model.plan").read_bytes() == (engines["dynamic"] / manifest.plan_file).read_bytes()
    assert "max_batch_size: 4" in (repo / "toy/config.pbtxt").read_text()
    assert export_triton(engines["dynamic"], repo, options).status is ExportStatus.UNCHANGED
    other = TritonOptions(model_name="toy", max_batch=2)
    with pytest.raises(ConfigError, match="--force"):
        export_triton(engines["dynamic"], repo, other)
    assert "max_batch_size: 4" in (repo / "toy/config.pbtxt").read_text()
    assert export_triton(engines["dynamic"], repo, other, force=True).status is ExportStatus.REPLACED
    assert "max_batch_size: 2" in (repo / "toy/config.pbtxt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository"]  # no staging leftovers


def test_max_batch_beyond_profile_is_refused(engines: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exceeds the engine profile"):
        export_triton(engines["dynamic"], tmp_path / "repo", TritonOptions(model_name="toy", max_batch=64))
    with pytest.raises(ConfigError, match="no dynamic batch"):
        export_triton(engines["fixed"], tmp_path / "repo", TritonOptions(model_name="toy", max_batch=8))
    assert not (tmp_path / "repo").exists()


def test_unknown_dtype_is_named(engines: dict[str, Path]) -> None:
    manifest = read_manifest(engines["dynamic"])
    odd = msgspec.structs.replace(manifest, outputs=(TensorSpec(name="y", dtype="float8e4m3", shape=(-1, -1, 8)),))
    with pytest.raises(ConfigError, match=r"'float8e4m3'.*allowed"):
        render_config(odd, TritonOptions(model_name="toy"))


def test_plugin_library_is_copied_with_server_flag(engines: dict[str, Path], tmp_path: Path) -> None:
    engine = tmp_path / "engine"
    engine.mkdir()
    manifest = read_manifest(engines["dynamic"])
    lib = tmp_path / "libbuild_engine_plugins.so"
    lib.write_bytes(b"\x7fELF plugin library")
    (engine / manifest.plan_file).write_bytes((engines["dynamic"] / manifest.plan_file).read_bytes())
    with_plugin = msgspec.structs.replace(manifest, plugins=(
        PluginRecord(op="build_engine::LayerNormQuantize", version="1", source=str(lib)),
    ))
    (engine / MANIFEST_FILE).write_text(with_plugin.to_json())
    result = export_triton(engine, tmp_path / "repo", TritonOptions(model_name="plug"))
    assert (tmp_path / "repo/plug/plugins" / lib.name).read_bytes() == lib.read_bytes()
    assert any("--backend-config=tensorrt,plugins=" in note for note in result.notes)
    assert EngineManifest.from_json(with_plugin.to_json()) == with_plugin


def test_cli_export_and_bad_inputs(engines: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    repo = tmp_path / "repo"
    assert main(["export-triton", str(engines["dynamic"]), "--repo", str(repo), "--instances", "2"]) == 0
    assert "written" in capsys.readouterr().out
    assert main(["export-triton", str(engines["dynamic"]), "--repo", str(repo), "--instances", "2"]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert main(["export-triton", str(tmp_path), "--repo", str(tmp_path / "r2")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    a_file = tmp_path / "repo_file"
    a_file.write_text("x")
    assert main(["export-triton", str(engines["dynamic"]), "--repo", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    missing = tmp_path / "no" / "repo"
    assert main(["export-triton", str(engines["dynamic"]), "--repo", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err and not (tmp_path / "no").exists()
    assert not (tmp_path / "r2").exists()


def test_text_front_end_configs_and_tokenizer_model(tmp_path: Path) -> None:
    """Tokenizer model + ensemble for a token-id engine: configs parse; model.py tokenizes like calib does."""
    import importlib.util

    import numpy as np

    from builder.intake.minilm import tokenizer_json_path
    from calib.tokenize import load_tokenizer

    x = onnx_helper_token_model()
    model_path = save(x, tmp_path / "tok.onnx")
    engine = build_engine_dir(BuildInputs(model_path=model_path), FAST, tmp_path / "engines" / "tok").engine_dir
    repo = tmp_path / "repo"
    result = export_triton(engine, repo, TritonOptions(model_name="tok"), tokenizer=tokenizer_json_path())
    assert result.extra_models == ("tok_tokenizer", "tok_text")
    for name in ("tok", "tok_tokenizer", "tok_text"):
        validate_config((repo / name / "config.pbtxt").read_text())
    assert 'platform: "ensemble"' in (repo / "tok_text/config.pbtxt").read_text()
    spec = importlib.util.spec_from_file_location("tok_model", repo / "tok_tokenizer/1/model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    texts = ["A fine, thoughtful film.", "Dull."]
    arrays = module.encode(module.load_tokenizer(repo / "tok_tokenizer/1/tokenizer.json"), texts)
    reference = load_tokenizer(tokenizer_json_path(), max_length=16, pad_to=16).encode_batch(texts)
    np.testing.assert_array_equal(arrays["input_ids"], [e.ids for e in reference])
    np.testing.assert_array_equal(arrays["attention_mask"], [e.attention_mask for e in reference])
    assert arrays["input_ids"].dtype == np.int64
    again = export_triton(engine, repo, TritonOptions(model_name="tok"), tokenizer=tokenizer_json_path())
    assert again.status is ExportStatus.UNCHANGED


def test_text_front_end_needs_token_inputs(engines: dict[str, Path], tmp_path: Path) -> None:
    from builder.intake.minilm import tokenizer_json_path

    with pytest.raises(ConfigError, match="token ids"):
        export_triton(engines["dynamic"], tmp_path / "repo", TritonOptions(model_name="toy"),
                      tokenizer=tokenizer_json_path())
    assert not (tmp_path / "repo").exists()


def onnx_helper_token_model() -> onnx.ModelProto:
    """input_ids, attention_mask int64 [b, s] -> Cast -> Add -> y float [b, s] (a token-id engine in miniature)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])
    nodes = [helper.make_node("Cast", ["input_ids"], ["fi"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["fm"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["fi", "fm"], ["y"])]
    graph = helper.make_graph(nodes, "tok", [ids, mask], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
