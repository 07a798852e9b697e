"""Decoder graphs with a KV cache: profile dimensions, manifest, a real TensorRT-RTX build, Triton config.

The toy is a one-layer Llama-style decoder built in code with the input and output names of a Hugging Face
export: ``input_ids``, ``attention_mask`` [batch, past+seq], ``position_ids``, ``past_key_values.0.key/value``
[batch, kv_heads, past, head_dim] in; ``logits``, ``present.0.key/value`` out. Its position table has 64 rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.backends.dims import PAST, SEQ, TOTAL, check_profiles, input_dim_roles, profile_shapes
from builder.backends.options import BackendName, BuildOptions, DimRange, ShapeProfile
from builder.cli.main import main
from calib.errors import ConfigError
from tests.unit.test_backend_rtx import save

VOCAB, HIDDEN, HEADS, HEAD_DIM, POSITIONS = 32, 16, 2, 8, 64


def toy_decoder(dim_names: dict[str, str] | None = None) -> onnx.ModelProto:
    """One attention layer over a KV cache (past ++ new keys/values), tied to a 64-row position table."""
    names = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length",
             "total": "total_sequence_length", **(dim_names or {})}
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    inits = [w("embed", VOCAB, HIDDEN), w("positions.weight", POSITIONS, HIDDEN), w("wq", HIDDEN, HIDDEN),
             w("wk", HIDDEN, HIDDEN), w("wv", HIDDEN, HIDDEN), w("lm_head", HIDDEN, VOCAB),
             numpy_helper.from_array(np.array([0, 0, HEADS, HEAD_DIM], np.int64), "split_heads"),
             numpy_helper.from_array(np.array([0, 0, HIDDEN], np.int64), "merge_heads"),
             numpy_helper.from_array(np.array(1 / np.sqrt(HEAD_DIM), np.float32), "inv_sqrt_d"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "mask_axes")]
    node = helper.make_node
    nodes = [node("Gather", ["embed", "input_ids"], ["tok"]),
             node("Gather", ["positions.weight", "position_ids"], ["pos"], name="position_gather"),
             node("Add", ["tok", "pos"], ["h"])]
    for name, weight in (("q", "wq"), ("k", "wk"), ("v", "wv")):
        nodes += [node("MatMul", ["h", weight], [f"{name}_flat"]),
                  node("Reshape", [f"{name}_flat", "split_heads"], [f"{name}_heads"]),
                  node("Transpose", [f"{name}_heads"], [f"{name}_new"], perm=[0, 2, 1, 3])]
    nodes += [node("Concat", ["past_key_values.0.key", "k_new"], ["present.0.key"], axis=2),
              node("Concat", ["past_key_values.0.value", "v_new"], ["present.0.value"], axis=2),
              node("Transpose", ["present.0.key"], ["k_t"], perm=[0, 1, 3, 2]),
              node("MatMul", ["q_new", "k_t"], ["qk"]), node("Mul", ["qk", "inv_sqrt_d"], ["scores"]),
              node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
              node("Sub", ["one", "mask_f"], ["masked"]), node("Mul", ["masked", "neg"], ["bias2d"]),
              node("Unsqueeze", ["bias2d", "mask_axes"], ["bias"]), node("Add", ["scores", "bias"], ["biased"]),
              node("Softmax", ["biased"], ["probs"], axis=-1),
              node("MatMul", ["probs", "present.0.value"], ["ctx_heads"]),
              node("Transpose", ["ctx_heads"], ["ctx_t"], perm=[0, 2, 1, 3]),
              node("Reshape", ["ctx_t", "merge_heads"], ["ctx"]), node("MatMul", ["ctx", "lm_head"], ["logits"])]
    b, s, p, t = names["batch"], names["seq"], names["past"], names["total"]
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    cache = [b, HEADS, p, HEAD_DIM]
    inputs = [helper.make_tensor_value_info("input_ids", i64, [b, s]),
              helper.make_tensor_value_info("attention_mask", i64, [b, t]),
              helper.make_tensor_value_info("position_ids", i64, [b, s]),
              helper.make_tensor_value_info("past_key_values.0.key", f32, cache),
              helper.make_tensor_value_info("past_key_values.0.value", f32, cache)]
    outputs = [helper.make_tensor_value_info("logits", f32, [b, s, VOCAB]),
               helper.make_tensor_value_info("present.0.key", f32, [b, HEADS, t, HEAD_DIM]),
               helper.make_tensor_value_info("present.0.value", f32, [b, HEADS, t, HEAD_DIM])]
    graph = helper.make_graph(nodes, "toy_decoder", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


PROFILE = ShapeProfile(batch=DimRange(min=1, opt=2, max=4), seq=DimRange(min=1, opt=8, max=16),
                       past=DimRange(min=0, opt=16, max=48))


def test_toy_decoder_runs_and_its_cache_path_equals_the_full_sequence() -> None:
    """The toy is a real decoder: prefill 5 tokens then decode 1 with the cache == one pass over 6 tokens."""
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(toy_decoder().SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[3, 7, 1, 4, 9, 2]], np.int64)

    def run(tokens: np.ndarray, start: int, past: list[np.ndarray]) -> list[np.ndarray]:
        n = tokens.shape[1]
        return session.run(None, {"input_ids": tokens, "position_ids": np.arange(start, start + n)[None],
                                  "attention_mask": np.ones((1, start + n), np.int64),
                                  "past_key_values.0.key": past[0], "past_key_values.0.value": past[1]})

    empty = [np.zeros((1, HEADS, 0, HEAD_DIM), np.float32)] * 2
    full = run(ids, 0, empty)
    prefill = run(ids[:, :5], 0, empty)
    step = run(ids[:, 5:], 5, prefill[1:])
    np.testing.assert_allclose(step[0][0, -1], full[0][0, -1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step[1], full[1], rtol=1e-6, atol=1e-6)


def test_every_input_axis_gets_its_profile_dimension() -> None:
    roles = input_dim_roles(toy_decoder())
    assert roles["attention_mask"] == ("batch", TOTAL)
    assert roles["past_key_values.0.key"] == ("batch", None, PAST, None)
    assert roles["input_ids"] == roles["position_ids"] == ("batch", SEQ)
    assert profile_shapes("attention_mask", (-1, -1), PROFILE, roles) == ((1, 1), (2, 24), (4, 64))
    assert profile_shapes("past_key_values.0.value", (-1, HEADS, -1, HEAD_DIM), PROFILE, roles) == (
        (1, HEADS, 0, HEAD_DIM), (2, HEADS, 16, HEAD_DIM), (4, HEADS, 48, HEAD_DIM))
    # the names builder.intake.decoder exports with give the same dimensions
    intake = input_dim_roles(toy_decoder({"batch": "batch", "seq": "sequence", "past": "past_sequence",
                                          "total": "total_sequence"}))
    assert intake == roles
    # an exporter that names the mask axis like input_ids' sequence: the shared symbol wins
    same = input_dim_roles(toy_decoder({"total": "sequence_length"}))
    assert same["attention_mask"] == ("batch", SEQ)


def test_kv_cache_needs_past_and_only_decoders_take_it() -> None:
    roles = input_dim_roles(toy_decoder())
    with pytest.raises(ConfigError, match="--past min,opt,max"):
        check_profiles(roles, [ShapeProfile(batch=PROFILE.batch, seq=PROFILE.seq)])
    check_profiles(roles, [PROFILE])
    encoder = {"input_ids": ("batch", SEQ), "attention_mask": ("batch", SEQ)}
    with pytest.raises(ConfigError, match="only for decoder"):
        check_profiles(encoder, [PROFILE])


def test_decoder_engine_builds_with_a_cache_profile_and_exports_to_triton(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (build-engine[rtx]) is not installed")
    from builder.engine.manifest import read_manifest
    from builder.serve.config import TritonOptions, render_config, validate_config

    model = save(toy_decoder(), tmp_path / "decoder.onnx")
    engine = tmp_path / "decoder"
    flags = ["--backend", "tensorrt-rtx", "--arch", "sm86", "--opt-level", "0", "--batch", "1,2,4", "--seq", "1,8,16"]
    assert main(["build", str(model), "-o", str(engine), *flags]) == 2
    assert "--past" in capsys.readouterr().err
    # past + seq up to 48 + 32 = 80 positions: more than the 64-row position table
    assert main(["build", str(model), "-o", str(engine), *flags[:-1], "1,8,32", "--past", "0,16,48"]) == 2
    assert "64 position embeddings" in capsys.readouterr().err
    assert main(["build", str(model), "-o", str(engine), *flags, "--past", "0,16,48"]) == 0
    manifest = read_manifest(engine)
    assert manifest.options.profiles[0] == PROFILE
    shapes = manifest.profiles[0]
    assert shapes["attention_mask"] == {"min": [1, 1], "opt": [2, 24], "max": [4, 64]}
    assert shapes["past_key_values.0.key"] == {"min": [1, 2, 0, 8], "opt": [2, 2, 16, 8], "max": [4, 2, 48, 8]}
    assert shapes["input_ids"] == {"min": [1, 1], "opt": [2, 8], "max": [4, 16]}
    assert {t.name: t.shape for t in manifest.outputs}["present.0.key"] == (-1, HEADS, -1, HEAD_DIM)
    text = render_config(manifest, TritonOptions(model_name="decoder"))
    assert "max_batch_size: 4" in text
    assert 'name: "past_key_values.0.key"\n    data_type: TYPE_FP32\n    dims: [ 2, -1, 8 ]' in text
    assert 'name: "attention_mask"\n    data_type: TYPE_INT64\n    dims: [ -1 ]' in text
    assert 'name: "present.0.value"\n    data_type: TYPE_FP32\n    dims: [ 2, -1, 8 ]' in text
    pytest.importorskip("tritonclient.grpc", reason="config validation needs tritonclient")
    validate_config(text)


def test_past_options_round_trip_in_the_manifest_options() -> None:
    options = BuildOptions(backend=BackendName.TENSORRT_RTX, profiles=(PROFILE,))
    assert BuildOptions.from_dict(options.to_dict()).profiles == (PROFILE,)
