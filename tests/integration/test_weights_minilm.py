"""Weight quantizers and the accumulator verifier on the real MiniLM (real text from calib.data).

* a W8 per-channel Q/DQ graph of every weight GEMM (RTN, the lowering's INT8 rule) runs in ONNX Runtime, is
  proved overflow-free for a 32-bit accumulator, and at 16 bits the verifier lists exactly the channels a
  worst-sign input overflows;
* layer output error of RTN / OPTQ / GPFQ at 8 and 4 bits on held-out sentences (slow), and AXE at
  W4A8 P = 16, T = 128 proved overflow-free where plain OPTQ is not.

``python -m tests.integration.test_weights_minilm`` prints the layer-error table of the README.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builder.verify.accumulator import AccumulatorSpec, IntegerGemm, check_gemm, verify_model
from calib.weights import (
    AccumulatorTarget,
    GpfqConfig,
    GpfqObserver,
    HessianObserver,
    OptqConfig,
    QuantizedWeight,
    RtnConfig,
    ScaleMethod,
    gpfq,
    optq,
    rtn,
)


@dataclass(frozen=True)
class Gemm:
    node: str
    input: str
    weight: str
    layer: int | None
    role: str


def weight_gemms(model: onnx.ModelProto) -> list[Gemm]:
    """MatMuls whose second input is a 2-D float initializer, with a short role from the node name."""
    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if init is not None and len(init.dims) == 2:
            parts = node.name.split("/")
            layer = next((int(p.split(".")[1]) for p in parts if p.startswith("layer.")), None)
            role = {"query": "q", "key": "k", "value": "v", "attention": "o", "intermediate": "fc1",
                    "output": "fc2"}.get(parts[-2] if parts[-2] != "dense" else parts[-3], parts[-2])
            found.append(Gemm(node.name, node.input[0], node.input[1], layer, role))
    return found


def batches_of_rows(model_path: Path, tensors: list[str], texts: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Per batch of 16 sentences, the non-padding rows [tokens, K] (float32) of each named tensor."""
    import onnxruntime as ort

    from builder.intake.minilm import tokenizer_json_path
    from calib.tokenize import encode

    model = onnx.load(str(model_path))
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors)  # expose the GEMM inputs
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for feed in encode(texts, tokenizer_json_path(), max_length=128, batch_size=16):
        mask = feed["attention_mask"].astype(bool)
        outputs = session.run(tensors, dict(feed))
        yield {name: np.ascontiguousarray(out[mask], dtype=np.float32) for name, out in zip(tensors, outputs,
                                                                                              strict=True)}


def with_weights(model: onnx.ModelProto, weights: dict[str, QuantizedWeight], as_integers: bool) -> onnx.ModelProto:
    """A copy whose named weights are replaced: by INT8 + per-channel DequantizeLinear (``as_integers``), or by
    their dequantized float values (weight-only fake quantization, any block layout)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [i for i in out.graph.initializer if i.name not in weights]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    dq_nodes = []
    for name, q in weights.items():
        if not as_integers:
            out.graph.initializer.append(numpy_helper.from_array(q.dequantize(), name))
            continue
        assert q.block is None
        out.graph.initializer.extend([numpy_helper.from_array(q.values, f"{name}_int8"),
                                      numpy_helper.from_array(q.scales, f"{name}_scale"),
                                      numpy_helper.from_array(np.zeros_like(q.values[0]), f"{name}_zero")])
        dq_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"],
                                         [name], name=f"{name}_DequantizeLinear", axis=1))
    nodes = dq_nodes + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _texts(calibration: int, evaluation: int) -> tuple[list[str], list[str]]:
    from calib.data import calibration_texts, vader_splits

    return calibration_texts("vader", calibration), [s.text for s in vader_splits().train[:evaluation]]


def _embeddings(model: onnx.ModelProto, texts: list[str]) -> np.ndarray:
    import onnxruntime as ort

    from builder.intake.minilm import tokenizer_json_path
    from calib.tokenize import encode

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["sentence_embedding"], dict(f))[0]
                           for f in encode(texts, tokenizer_json_path(), max_length=128, batch_size=16)])


def test_w8_graph_is_proved_at_32_bits_and_listed_at_16(minilm_onnx: Path) -> None:
    model = onnx.load(str(minilm_onnx))
    gemms = weight_gemms(model)
    assert len(gemms) == 36
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {g.weight: rtn(inits[g.weight], RtnConfig(bits=8)) for g in gemms}
    lowered = with_weights(model, weights, as_integers=True)
    texts, _ = _texts(8, 0)
    reference, quantized = _embeddings(model, texts), _embeddings(lowered, texts)
    assert np.min(np.sum(reference * quantized, axis=1)) > 0.99  # the graph is the model, weights in INT8

    proved = verify_model(lowered, AccumulatorSpec(accumulator_bits=32))
    assert proved.proved and len(proved.gemms) == 36
    assert max(g.total_bits_needed for g in proved.gemms) <= 32
    report = verify_model(lowered, AccumulatorSpec(accumulator_bits=16, tile=128), max_listed=100_000)
    assert not report.proved
    for check in report.gemms:  # brute force: the worst-sign input of every (tile, channel)
        q = weights[next(g.weight for g in gemms if g.node == check.node)].values.astype(np.int64)
        expected = set()
        for j, start in enumerate(range(0, q.shape[0], 128)):
            part = q[start:start + 128]
            high = np.sum(np.where(part > 0, 127, -128) * part, axis=0)
            low = np.sum(np.where(part > 0, -128, 127) * part, axis=0)
            expected |= {(j, int(c)) for c in np.nonzero((high > 2**15 - 1) | (low < -(2**15)))[0]}
        assert {(c.tile, c.channel) for c in check.channels} == expected
        assert check.overflowing == len(expected)


# ---------------------------------------------------------------------------------------------- layer errors

LAYERS = (0, 2, 5)
ROLES = ("q", "o", "fc1", "fc2")


def _fake_quant(x: np.ndarray, amax: float) -> np.ndarray:
    scale = np.float32(amax / 127)
    return (np.clip(np.rint(x / scale), -128, 127) * scale).astype(np.float32)


def _statistics(xc: np.ndarray, xtc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(OPTQ's H on X~, GPFQ's H~ and G) from the calibration rows."""
    hess = HessianObserver(xc.shape[1])
    hess.update(xtc)
    pair = GpfqObserver(xc.shape[1])
    pair.update(xtc, xc)
    return (hess.matrix(), *pair.matrices())


AXE16 = AccumulatorTarget(accumulator_bits=16, activation_bits=8, signed_inputs=True, tile=128)
METHODS = ("rtn-max", "rtn-mse", "optq", "optq-actorder-mse", "gpfq", "axe-optq", "axe-gpfq")


def _methods(w: np.ndarray, stats: tuple[np.ndarray, np.ndarray, np.ndarray], bits: int, block: int | None,
             names: tuple[str, ...]) -> dict[str, QuantizedWeight]:
    """The named methods' codes (the AXE ones only at W4 per channel: 16-bit tiles of 128 inputs)."""
    hess, h, g = stats
    run = {
        "rtn-max": lambda: rtn(w, RtnConfig(bits=bits, block=block)),
        "rtn-mse": lambda: rtn(w, RtnConfig(bits=bits, block=block, scale_method=ScaleMethod.MSE)),
        "optq": lambda: optq(w, hess, OptqConfig(bits=bits, block=block)),
        "optq-actorder-mse": lambda: optq(w, hess, OptqConfig(bits=bits, block=block, act_order=True,
                                                              static_block_scales=block is not None,
                                                              scale_method=ScaleMethod.MSE)),
        "gpfq": lambda: gpfq(w, h, g, GpfqConfig(bits=bits, block=block)),
    }
    if bits == 4 and block is None:
        run["axe-optq"] = lambda: optq(w, hess, OptqConfig(bits=4, accumulator=AXE16))
        run["axe-gpfq"] = lambda: gpfq(w, h, g, GpfqConfig(bits=4, accumulator=AXE16))
    return {name: quantize() for name, quantize in run.items() if name in names}


def layer_errors(model_path: Path, calibration: int = 128, evaluation: int = 128,
                 configs: tuple[tuple[str, int, int | None], ...] = (
                     ("A16", 8, None), ("A16", 4, None), ("A16", 4, 128), ("A8", 8, None), ("A8", 4, None)),
                 names: tuple[str, ...] = METHODS) -> list[dict[str, object]]:
    """Relative output error ||X W - X~ W_q|| / ||X W|| on held-out rows, per GEMM, setting and method.

    Settings: "A16" (X~ = X, weight-only) and "A8" (X~ = INT8 per-tensor fake quantization of X, amax from the
    calibration rows; OPTQ's H and GPFQ's H~ are taken on X~, GPFQ's G pairs X~ with X).
    """
    model = onnx.load(str(model_path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    gemms = [g for g in weight_gemms(model) if g.layer in LAYERS and g.role in ROLES]
    tensors = list(dict.fromkeys(g.input for g in gemms))
    calib_texts, eval_texts = _texts(calibration, evaluation)
    xc = {t: np.concatenate(rows) for t, rows in zip(tensors, zip(*(
        [b[t] for t in tensors] for b in batches_of_rows(model_path, tensors, calib_texts)), strict=True),
        strict=True)}
    xe = {t: np.concatenate(rows) for t, rows in zip(tensors, zip(*(
        [b[t] for t in tensors] for b in batches_of_rows(model_path, tensors, eval_texts)), strict=True),
        strict=True)}
    results: list[dict[str, object]] = []
    for gemm in gemms:
        w = inits[gemm.weight]
        amax = float(np.abs(xc[gemm.input]).max())
        target = xe[gemm.input].astype(np.float64) @ w
        for setting in ("A16", "A8"):
            quant = (lambda x: x) if setting == "A16" else (lambda x, a=amax: _fake_quant(x, a))
            xtc, xte = quant(xc[gemm.input]), quant(xe[gemm.input]).astype(np.float64)
            stats = _statistics(xc[gemm.input], xtc)
            for bits, block in [(b, k) for s, b, k in configs if s == setting]:
                allowed = names if setting == "A8" else tuple(n for n in names if not n.startswith("axe"))
                methods = _methods(w, stats, bits, block, allowed)  # AXE needs integer (A8) inputs
                for method, q in methods.items():
                    error = float(np.linalg.norm(xte @ q.dequantize() - target) / np.linalg.norm(target))
                    results.append({"gemm": f"L{gemm.layer}.{gemm.role}", "setting": setting, "bits": bits,
                                    "block": block, "method": method, "error": error, "codes": q.values})
    return results


def _mean(results: list[dict[str, object]], **where: object) -> float:
    picked = [float(r["error"]) for r in results if all(r[k] == v for k, v in where.items())]
    assert picked, where
    return float(np.mean(picked))


@pytest.mark.slow
def test_optq_and_gpfq_beat_rtn_at_4_bits_and_axe_is_proved(minilm_onnx: Path) -> None:
    results = layer_errors(minilm_onnx, calibration=64, evaluation=64,
                           configs=(("A16", 4, None), ("A16", 8, None), ("A8", 4, None)),
                           names=("rtn-max", "optq", "gpfq", "axe-optq", "axe-gpfq"))
    for setting in ("A16", "A8"):
        rtn4 = _mean(results, setting=setting, bits=4, block=None, method="rtn-max")
        assert _mean(results, setting=setting, bits=4, block=None, method="optq") < 0.9 * rtn4
        assert _mean(results, setting=setting, bits=4, block=None, method="gpfq") < 0.9 * rtn4
    rtn8 = _mean(results, setting="A16", bits=8, block=None, method="rtn-max")
    assert _mean(results, setting="A16", bits=8, block=None, method="optq") <= rtn8
    spec = AccumulatorSpec(accumulator_bits=16, tile=128)
    overflowing: dict[str, int] = {"optq": 0, "axe-optq": 0, "axe-gpfq": 0}
    for r in results:
        if r["method"] in overflowing and r["setting"] == "A8" and r["bits"] == 4:
            check = check_gemm(IntegerGemm(node=str(r["gemm"]), op_type="MatMul", weight="w",
                                           values=np.asarray(r["codes"]), activation_quantized=True), spec)
            overflowing[str(r["method"])] += check.overflowing
    assert overflowing["optq"] > 0  # without AXE, W4A8 MiniLM GEMMs can overflow a 16-bit tile accumulator
    assert overflowing["axe-optq"] == overflowing["axe-gpfq"] == 0


def _print_table(results: list[dict[str, object]]) -> None:
    columns = [("A16", 8, None), ("A16", 4, None), ("A16", 4, 128), ("A8", 8, None), ("A8", 4, None)]
    print("| method | " + " | ".join(f"W{b}{'g' + str(k) if k else ''} {s}" for s, b, k in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for method in ("rtn-max", "rtn-mse", "optq", "optq-actorder-mse", "gpfq", "axe-optq", "axe-gpfq"):
        cells = []
        for s, b, k in columns:
            picked = [r for r in results if (r["setting"], r["bits"], r["block"], r["method"]) == (s, b, k, method)]
            cells.append(f"{_mean(picked):.4f}" if picked else "-")
        print(f"| {method} | " + " | ".join(cells) + " |")
    spec = AccumulatorSpec(accumulator_bits=16, tile=128)
    for method in ("optq", "axe-optq", "axe-gpfq"):
        rows = [r for r in results if (r["setting"], r["bits"], r["block"], r["method"]) == ("A8", 4, None, method)]
        bad = sum(check_gemm(IntegerGemm(node="g", op_type="MatMul", weight="w", values=np.asarray(r["codes"]),
                                         activation_quantized=True), spec).overflowing for r in rows)
        print(f"W4A8 {method}: (tile, channel) pairs that can overflow a 16-bit accumulator, T=128: {bad}")


if __name__ == "__main__":
    from builder.intake.minilm import ensure_minilm_onnx

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    _print_table(layer_errors(ensure_minilm_onnx(), calibration=n, evaluation=n))
