"""Tokenizer discovery, the input map, the embedding-table check and the checked text encoder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.cli.main import main
from builder.evaluate.tokenizer import is_bundled_minilm, model_text_encoder
from builder.intake.minilm import minilm_model_dir, tokenizer_json_path
from calib.errors import ConfigError
from calib.model_inputs import embedding_rows, model_inputs, parse_input_map
from calib.text_encoder import open_text_encoder
from calib.tokenize import encode
from tests.tiny_decoder import tiny_llama
from tests.unit.test_evaluate_runner import pooled_toy

TEXTS = ["A gripping, beautifully acted film.", "Dull.", "It never decides what it wants to be, and neither do we."]


def _identity_model(inputs: dict[str, int], rows: int = 30522, table: str = "plain") -> onnx.ModelProto:
    """Echoes every input (as float) and gathers the token ids from a ``rows``-row table (plain, DQ or Cast+Mul)."""
    nodes, inits = [], []
    if table == "plain":
        inits.append(numpy_helper.from_array(np.zeros((rows, 4), np.float32), "emb"))
    elif table == "dq":
        inits += [numpy_helper.from_array(np.zeros((rows, 4), np.int8), "q"),
                  numpy_helper.from_array(np.array(0.1, np.float32), "s")]
        nodes.append(helper.make_node("DequantizeLinear", ["q", "s"], ["emb"]))
    else:
        inits += [numpy_helper.from_array(np.zeros((rows, 4), np.int8), "q"),
                  numpy_helper.from_array(np.array(0.1, np.float32), "s")]
        nodes += [helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["s", "qf"], ["emb"])]
    tokens = next(iter(inputs))
    nodes.append(helper.make_node("Cast", [tokens], ["ids64"], to=TensorProto.INT64))
    nodes.append(helper.make_node("Gather", ["emb", "ids64"], ["embedded"]))
    outputs = [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, None)]
    for name in inputs:
        nodes.append(helper.make_node("Cast", [name], [f"{name}_out"], to=TensorProto.FLOAT))
        outputs.append(helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None))
    infos = [helper.make_tensor_value_info(n, t, ["b", "s"]) for n, t in inputs.items()]
    graph = helper.make_graph(nodes, "echo", infos, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_feeds_follow_the_model_inputs_and_match_the_reference_tokenizer(tmp_path: Path) -> None:
    model = _identity_model({"input_ids": TensorProto.INT32, "attention_mask": TensorProto.INT64,
                             "token_type_ids": TensorProto.INT64, "position_ids": TensorProto.INT64})
    encoder = open_text_encoder(model, tokenizer_json_path())
    batch = encoder.encode(TEXTS, max_length=16)
    (expected,) = list(encode(TEXTS, tokenizer_json_path(), max_length=16, batch_size=8))  # calib's own path
    np.testing.assert_array_equal(batch.ids, expected["input_ids"])
    np.testing.assert_array_equal(batch.mask, expected["attention_mask"])
    assert batch.feeds["input_ids"].dtype == np.int32  # the dtype the graph declares
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in session.get_outputs()], session.run(None, batch.feeds), strict=True))
    np.testing.assert_array_equal(out["token_type_ids_out"], 0)
    mask = expected["attention_mask"]
    for row in range(len(TEXTS)):  # positions 0..n-1 on real tokens (right padding)
        n = int(mask[row].sum())
        np.testing.assert_array_equal(out["position_ids_out"][row, :n], np.arange(n))


@pytest.mark.parametrize("table", ["plain", "dq", "castmul"])
def test_embedding_rows_through_weight_only_quantization(table: str) -> None:
    assert embedding_rows(_identity_model({"input_ids": TensorProto.INT64}, rows=777, table=table), "input_ids") == 777


def test_input_map_inferred_explicit_and_errors() -> None:
    model = _identity_model({"ids": TensorProto.INT64, "am": TensorProto.INT64})
    with pytest.raises(ConfigError, match=r"input 'am' has no text role; map it with --input-map ROLE=am"):
        model_inputs(model)
    roles = model_inputs(model, parse_input_map(["mask=am"]))
    assert (roles.tokens, roles.mask, roles.token_types) == ("ids", "am", None)
    assert parse_input_map("tokens=ids, mask=am") == {"tokens": "ids", "mask": "am"}
    with pytest.raises(ConfigError, match=r"unknown role 'tokns'.*did you mean 'tokens'"):
        parse_input_map(["tokns=ids"])
    with pytest.raises(ConfigError, match=r"has no input 'idz'.*did you mean 'ids'"):
        model_inputs(model, {"tokens": "idz", "mask": "am"})
    with pytest.raises(ConfigError, match="expected ROLE=INPUT"):
        parse_input_map(["tokens"])


def test_tokenizer_search_next_to_model_in_onnx_folder_and_errors(tmp_path: Path) -> None:
    model = _identity_model({"input_ids": TensorProto.INT64, "attention_mask": TensorProto.INT64})
    onnx_dir = tmp_path / "repo" / "onnx"
    onnx_dir.mkdir(parents=True)
    onnx.save(model, str(onnx_dir / "model.onnx"))
    with pytest.raises(ConfigError, match=r"no tokenizer found.*repo/onnx.*repo/\{tokenizer.json.*--tokenizer"):
        model_text_encoder(onnx_dir / "model.onnx")
    shutil.copy(tokenizer_json_path(), tmp_path / "repo" / "tokenizer.json")  # Hugging Face repository layout
    found = model_text_encoder(onnx_dir / "model.onnx").info.tokenizer
    assert found.path == tmp_path / "repo" / "tokenizer.json" and "next to the model" in found.reason
    with pytest.raises(ConfigError, match="does not exist"):
        model_text_encoder(onnx_dir / "model.onnx", tmp_path / "nope.json")


def test_hugging_face_folder_without_tokenizer_json_is_converted(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_model_dir() / name, folder / name)
    model = _identity_model({"input_ids": TensorProto.INT64, "attention_mask": TensorProto.INT64})
    converted = open_text_encoder(model, folder).encode(TEXTS, max_length=32)
    direct = open_text_encoder(model, tokenizer_json_path()).encode(TEXTS, max_length=32)
    np.testing.assert_array_equal(converted.ids, direct.ids)


def test_vocabulary_mismatch_names_both_sizes(tmp_path: Path) -> None:
    decoder = tiny_llama()
    with pytest.raises(ConfigError, match=r"largest token id is 30521 \(30522 ids\).*embedding table has 512 rows"):
        model_text_encoder(decoder, tokenizer_json_path())
    toy = tmp_path / "toy.onnx"
    onnx.save(pooled_toy(), str(toy))  # a 30522-row table
    with pytest.raises(ConfigError, match=r"tokenizer has 512 ids but the model's embedding table has 30522 rows"):
        model_text_encoder(toy, decoder.parent / "tokenizer.json")


def test_cli_exits_2_on_mismatch_and_on_missing_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toy = tmp_path / "toy.onnx"
    onnx.save(pooled_toy(), str(toy))
    assert main(["evaluate", str(toy), "--reference", str(toy)]) == 2
    assert "no tokenizer found" in capsys.readouterr().err
    assert main(["evaluate", str(toy), "--reference", str(toy), "--tokenizer", str(tiny_llama().parent)]) == 2
    assert "30522 rows" in capsys.readouterr().err


def test_bundled_tokenizer_only_for_the_bundled_model(minilm_onnx: Path, tmp_path: Path) -> None:
    assert is_bundled_minilm(minilm_onnx) and is_bundled_minilm(onnx.load(str(minilm_onnx)))
    copy = tmp_path / "copy.onnx"
    shutil.copy(minilm_onnx, copy)  # the user's copy of the export: same bytes
    assert model_text_encoder(copy).info.tokenizer.kind == "known"
    toy = tmp_path / "toy.onnx"
    onnx.save(pooled_toy(), str(toy))
    assert not is_bundled_minilm(toy)
    # a derivative of the bundled model is served through its FP32 reference
    assert model_text_encoder(toy, reference=minilm_onnx).info.tokenizer.path == tokenizer_json_path()


def test_whole_text_ids_ignore_the_last_batch_truncation() -> None:
    encoder = model_text_encoder(tiny_llama())
    text = " ".join(TEXTS * 20)
    encoder.encode(TEXTS, max_length=8)  # leaves truncation at 8 on the tokenizer object
    from tokenizers import Tokenizer

    expected = Tokenizer.from_file(str(tiny_llama().parent / "tokenizer.json")).encode(text, add_special_tokens=False)
    assert encoder.token_ids(text) == expected.ids and len(expected.ids) > 8
