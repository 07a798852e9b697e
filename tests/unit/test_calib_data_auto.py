"""``--calib-data auto`` (the default): running text for language models, rated sentences for encoders."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from builder.cli.common import calib_data_for
from builder.cli.main import main
from tests.tiny_decoder import tiny_llama
from tests.toygraphs import bert_block_model


def _identity_graph(path: Path, output: str, dims: list[str | int]) -> Path:
    """input_ids -> Cast -> an output of the given name and rank (no KV cache)."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    out = helper.make_tensor_value_info(output, TensorProto.FLOAT, dims)
    node = helper.make_node("Cast", ["input_ids"], [output], to=TensorProto.FLOAT)
    onnx.save(helper.make_model(helper.make_graph([node], "g", [ids], [out])), str(path))
    return path


def test_kv_cache_decoder_gets_running_text() -> None:
    assert calib_data_for("auto", tiny_llama()) == "shakespeare"


def test_sentence_encoder_gets_sentences(tmp_path: Path) -> None:
    model = tmp_path / "toy.onnx"
    onnx.save(bert_block_model(layers=1, hidden=48), str(model))
    assert calib_data_for("auto", model) == "vader"


@pytest.mark.parametrize(("name", "dims", "expected"), [
    ("logits", ["batch", "seq", 512], "shakespeare"),  # a causal LM exported without a cache
    ("lm_logits", ["batch", "seq", 512], "shakespeare"),
    ("logits", ["batch", 2], "vader"),  # a sequence classifier's logits are [batch, classes]
    ("last_hidden_state", ["batch", "seq", 64], "vader"),
])
def test_logits_output_decides_without_cache(tmp_path: Path, name: str, dims: list[str | int],
                                             expected: str) -> None:
    assert calib_data_for("auto", _identity_graph(tmp_path / "m.onnx", name, dims)) == expected


def test_explicit_source_is_kept_and_unreadable_model_falls_back(tmp_path: Path) -> None:
    assert calib_data_for("lee", tiny_llama()) == "lee"
    assert calib_data_for("vader", tiny_llama()) == "vader"
    assert calib_data_for("auto", tmp_path / "missing.onnx") == "vader"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    assert calib_data_for("auto", broken) == "vader"


def test_calibrate_cli_reads_running_text_for_a_decoder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["calibrate", str(tiny_llama()), "--samples", "4", "--batch-size", "2", "--max-length", "32",
                 "-o", str(tmp_path / "out")])
    assert code == 0
    assert "on 4 texts (shakespeare)" in capsys.readouterr().out
