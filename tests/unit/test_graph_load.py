"""Graph intake: load_model accepts valid models and rejects bad files with the documented exit codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builder.cli.main import main
from builder.graph.load import MAX_OPSET, MIN_OPSET, load_model, model_sha256, name_nodes
from calib.errors import ConfigError, GraphError
from tests.toygraphs import bert_block_model, mlp_model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.opset_import[:]
    copy.opset_import.append(helper.make_opsetid("", version))
    return copy


def test_loads_valid_model_with_all_nodes_named(tmp_path: Path) -> None:
    model = bert_block_model(layers=1)
    loaded = load_model(_save(model, tmp_path / "toy.onnx"))
    assert [n.name for n in loaded.graph.node] == [n.name for n in model.graph.node]
    assert model_sha256(loaded) == model_sha256(model)


def test_missing_file_is_config_error_with_close_match(tmp_path: Path) -> None:
    _save(mlp_model(), tmp_path / "encoder.onnx")
    with pytest.raises(ConfigError, match=r"does not exist; did you mean 'encoder.onnx'"):
        load_model(tmp_path / "encodr.onnx")
    assert main(["analyze", str(tmp_path / "encodr.onnx")]) == 2


def test_directory_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello, this is not a model\n", b"\x00\xff" * 64])
def test_non_onnx_file_is_graph_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(GraphError):
        load_model(path)
    assert main(["analyze", str(path)]) == 3


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.97])
def test_truncated_model_is_graph_error(tmp_path: Path, fraction: float) -> None:
    data = bert_block_model(layers=1).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(GraphError):
        load_model(path)


@pytest.mark.parametrize("version", [MIN_OPSET - 2, MIN_OPSET - 1, MAX_OPSET + 1])
def test_unsupported_opset_names_the_supported_range(tmp_path: Path, version: int) -> None:
    path = _save(_with_opset(mlp_model(), version), tmp_path / "old.onnx")
    with pytest.raises(GraphError, match=rf"opset {version}; supported default-domain opsets are 13\.\.23"):
        load_model(path)
    assert main(["analyze", str(path)]) == 3


@pytest.mark.parametrize("version", [MIN_OPSET, MAX_OPSET])
def test_boundary_opsets_are_accepted(tmp_path: Path, version: int) -> None:
    assert load_model(_save(_with_opset(mlp_model(), version), tmp_path / "m.onnx")).opset_import[0].version == version


def test_checker_failure_is_graph_error(tmp_path: Path) -> None:
    model = mlp_model()
    model.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(GraphError, match="fails the ONNX checker"):
        load_model(_save(model, tmp_path / "broken.onnx"))


def _save_external(tmp_path: Path) -> tuple[Path, Path]:
    model = bert_block_model(layers=1)  # onnx.save moves its tensors out: use a fresh copy
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=1024)
    return path, tmp_path / "ext.data"


def test_external_data_is_loaded(tmp_path: Path) -> None:
    path, data = _save_external(tmp_path)
    assert data.stat().st_size > 0
    loaded = load_model(path)
    expected = {t.name: numpy_helper.to_array(t) for t in bert_block_model(layers=1).graph.initializer}
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), expected[tensor.name])


def test_missing_external_data_is_config_error(tmp_path: Path) -> None:
    path, data = _save_external(tmp_path)
    data.unlink()
    with pytest.raises(ConfigError, match=r"keeps its data in 'ext.data'.*does not exist"):
        load_model(path)
    assert main(["analyze", str(path)]) == 2


def test_truncated_external_data_is_graph_error(tmp_path: Path) -> None:
    path, data = _save_external(tmp_path)
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(GraphError, match="truncated"):
        load_model(path)


def test_name_nodes_fills_empty_and_duplicate_names() -> None:
    model = mlp_model()
    model.graph.node[0].name = ""
    model.graph.node[2].name = model.graph.node[1].name
    assert name_nodes(model) == 2
    names = [n.name for n in model.graph.node]
    assert "" not in names and len(set(names)) == len(names)
    assert names[0] == f"{model.graph.node[0].op_type}_0"
    assert name_nodes(model) == 0


def test_model_sha256_changes_with_weights() -> None:
    a, b = mlp_model(seed=0), mlp_model(seed=1)
    assert model_sha256(a) == model_sha256(mlp_model(seed=0))
    assert model_sha256(a) != model_sha256(b)


def test_cli_exit_code_for_a_model_without_gemm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "relu.onnx")
    assert main(["analyze", str(path)]) == 3
    assert "no GEMM with a constant weight" in capsys.readouterr().err
