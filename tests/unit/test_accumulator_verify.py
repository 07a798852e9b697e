"""The accumulator overflow verifier against brute-force integer dot products, on arrays and on toy Q/DQ graphs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import TensorProto, helper, numpy_helper

from builder.cli.main import main
from builder.verify.accumulator import AccumulatorReport, AccumulatorSpec, IntegerGemm, check_gemm, verify_model
from calib.errors import ConfigError, GraphError
from calib.schema import decode_json
from calib.weights.accumulator import input_range, worst_case


def _brute_force(q: np.ndarray, x_min: int, x_max: int, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Max and min of every tile's dot product over ALL integer inputs in range (exhaustive), [tiles, N]."""
    k = q.shape[0]
    inputs = np.array(list(itertools.product(range(x_min, x_max + 1), repeat=k)), dtype=np.int64)
    tiles = [inputs[:, s:s + tile] @ q[s:s + tile].astype(np.int64) for s in range(0, k, tile)]
    return np.stack([t.max(axis=0) for t in tiles]), np.stack([t.min(axis=0) for t in tiles])


@settings(max_examples=60, deadline=None)
@given(q=arrays(np.int8, st.tuples(st.integers(1, 4), st.integers(1, 3)), elements=st.integers(-127, 127)),
       bits=st.integers(1, 3), signed=st.booleans(), tile=st.integers(1, 4))
def test_worst_case_equals_exhaustive_search_over_all_inputs(q: np.ndarray, bits: int, signed: bool, tile: int) -> None:
    if bits == 1 and signed:
        bits = 2
    x_min, x_max = input_range(bits, signed)
    tile = min(tile, q.shape[0])
    high, low = worst_case(q, x_min, x_max, tile)
    bf_high, bf_low = _brute_force(q, x_min, x_max, tile)
    np.testing.assert_array_equal(high, bf_high)
    np.testing.assert_array_equal(low, bf_low)


def test_listed_channels_are_exactly_those_a_worst_sign_input_overflows() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(256, 40))
    q[:, :10] = np.abs(q[:, :10])  # one-signed channels: these overflow first
    spec = AccumulatorSpec(accumulator_bits=21, activation_bits=8, tile=128)
    check = check_gemm(IntegerGemm(node="g", op_type="MatMul", weight="w", values=q, activation_quantized=True),
                       spec, max_listed=10_000)
    acc_min, acc_max = -(2**20), 2**20 - 1
    expected = set()
    for j, start in enumerate(range(0, 256, 128)):
        part = q[start:start + 128]
        up = np.where(part > 0, 127, -128)  # per channel, the input that maximises the dot product
        down = np.where(part > 0, -128, 127)
        hi, lo = np.sum(up * part, axis=0), np.sum(down * part, axis=0)
        random_x = rng.integers(-128, 128, size=(500, 128))
        assert np.all(random_x @ part <= hi) and np.all(random_x @ part >= lo)
        expected |= {(j, c) for c in range(40) if hi[c] > acc_max or lo[c] < acc_min}
    assert expected and {(c.tile, c.channel) for c in check.channels} == expected
    assert check.overflowing == len(expected) and check.min_margin < 0
    margins = [c.margin for c in check.channels]
    assert margins == sorted(margins)


def _toy_model(w1: np.ndarray, w2_t: np.ndarray, zero_point: int = 0) -> onnx.ModelProto:
    """X -> Q/DQ -> MatMul(DQ(w1 [K, N], axis=1)) -> Gemm(DQ(w2_t [M, N], axis=0), transB=1) -> MatMul(float)."""
    k, n = w1.shape
    m = w2_t.shape[0]
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
        numpy_helper.from_array(w1.astype(np.int8), "w1_int8"),
        numpy_helper.from_array(np.full(n, 0.01, np.float32), "w1_scale"),
        numpy_helper.from_array(np.full(n, zero_point, np.int8), "w1_zero"),
        numpy_helper.from_array(w2_t.astype(np.int8), "w2_int8"),
        numpy_helper.from_array(np.full(m, 0.01, np.float32), "w2_scale"),
        numpy_helper.from_array(np.ones((m, 2), np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xdq"], name="xdq"),
        helper.make_node("DequantizeLinear", ["w1_int8", "w1_scale", "w1_zero"], ["w1"], name="w1_dq", axis=1),
        helper.make_node("MatMul", ["xdq", "w1"], ["y1"], name="fc1"),
        helper.make_node("DequantizeLinear", ["w2_int8", "w2_scale"], ["w2"], name="w2_dq", axis=0),
        helper.make_node("Gemm", ["y1", "w2"], ["y2"], name="fc2", transB=1),
        helper.make_node("MatMul", ["y2", "w3"], ["y"], name="float_head"),
    ]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model


def _weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    w1 = rng.integers(-20, 21, size=(4, 5))
    w1[:, 2] = 127  # channel 2 of fc1 is one-signed and large
    w2_t = rng.integers(-127, 128, size=(3, 5))  # Gemm transB=1: stored [N, K]
    return w1, w2_t


def test_verify_model_reads_matmul_and_transposed_gemm_weights() -> None:
    w1, w2_t = _weights()
    spec = AccumulatorSpec(accumulator_bits=14, activation_bits=3)
    report = verify_model(_toy_model(w1, w2_t), spec)
    assert [(g.node, g.op_type, g.k, g.n) for g in report.gemms] == [("fc1", "MatMul", 4, 5), ("fc2", "Gemm", 5, 3)]
    assert [g.activation_quantized for g in report.gemms] == [True, False]
    for check, q in zip(report.gemms, (w1, w2_t.T), strict=True):
        bf_high, bf_low = _brute_force(q, -4, 3, q.shape[0])
        assert (check.worst_high, check.worst_low) == (int(bf_high.max()), int(bf_low.min()))
    assert report.proved == (max(g.tile_bits_needed for g in report.gemms) <= 14)


def test_cli_proves_or_lists_overflows_with_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w1, w2_t = _weights()
    path = tmp_path / "toy.onnx"
    onnx.save(_toy_model(w1, w2_t), str(path))
    assert main(["verify-accumulator", str(path), "--accumulator-bits", "32"]) == 0
    assert "proved" in capsys.readouterr().out
    out_json = tmp_path / "report.json"
    # fc1 channel 2: 4 inputs * 127 * 128 = 65024 needs 17 bits; 16 cannot hold it
    assert main(["verify-accumulator", str(path), "--accumulator-bits", "16", "--json", str(out_json)]) == 3
    out = capsys.readouterr().out
    assert "fc1: 1 of 5 (tile, channel) pairs can overflow" in out and "channel     2" in out
    report = decode_json(out_json.read_text(), AccumulatorReport, "report", version=1)
    fc1 = report.gemms[0]
    assert not report.proved and fc1.channels[0].channel == 2
    worst = fc1.channels[0]
    assert (worst.worst_low, worst.worst_high) == (-4 * 127 * 128, 4 * 127 * 127)
    assert worst.margin == min(2**15 - 1 - 4 * 127 * 127, -4 * 127 * 128 + 2**15)  # the lower side binds
    assert json.loads(out_json.read_text())["spec"]["accumulator_bits"] == 16
    assert main(["verify-accumulator", str(path), "--accumulator-bits", "16", "--unsigned", "--tile", "2",
                 "--quiet"]) in (0, 3)
    assert main(["verify-accumulator", str(path), "--accumulator-bits", "16", "--tile", "9"]) == 2
    assert "accumulator tile 9 is larger than K" in capsys.readouterr().err
    assert main(["verify-accumulator", str(path), "--accumulator-bits", "1"]) == 2


def test_verifier_rejects_graphs_it_cannot_prove_anything_about() -> None:
    w1, w2_t = _weights()
    with pytest.raises(GraphError, match="non-zero or non-constant zero point"):
        verify_model(_toy_model(w1, w2_t, zero_point=3), AccumulatorSpec(accumulator_bits=16))
    float_only = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "f",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")]))
    with pytest.raises(GraphError, match="no MatMul/Gemm reads an integer weight"):
        verify_model(float_only, AccumulatorSpec(accumulator_bits=16))
    with pytest.raises(ConfigError, match="activation bits 0 not supported"):
        AccumulatorSpec(accumulator_bits=16, activation_bits=0)


def test_int4_blockwise_weights_are_read_as_integers() -> None:
    rng = np.random.default_rng(2)
    q = rng.integers(-7, 8, size=(8, 3))
    weight = helper.make_tensor("w_int4", TensorProto.INT4, [8, 3], q.flatten().tolist())
    scales = numpy_helper.from_array(np.full((2, 3), 0.1, np.float32), "w_scale")  # blocks of 4 along K
    nodes = [helper.make_node("DequantizeLinear", ["w_int4", "w_scale"], ["w"], name="w_dq", axis=0, block_size=4),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = helper.make_model(helper.make_graph(
        nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight, scales]),
        opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    check = verify_model(model, AccumulatorSpec(accumulator_bits=12, tile=4)).gemms[0]
    high, low = worst_case(q, -128, 127, 4)
    assert (check.worst_high, check.worst_low, check.tiles) == (int(high.max()), int(low.min()), 2)
