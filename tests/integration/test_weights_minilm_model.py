"""Whole-model effect of the weight quantizers on MiniLM: sentence-embedding cosine to FP32 on held-out text.

Every weight GEMM (36) is quantized from statistics of the float model's GEMM inputs over the calibration
sentences (one streaming pass; the Hessian observers hold one K x K matrix per distinct input, 24 of them).
"A16" keeps activations in float (weights fake-quantized: the graph computes with DQ(W)); "A8" adds a
per-tensor INT8 Q/DQ (max range from the calibration rows) on every GEMM input, and OPTQ/GPFQ see those
quantized inputs (GPFQ's X~ here is the INT8 image of the float model's input, not a layer-by-layer
quantized model). Held-out sentences: the VADER train split, never the calibration ones.

``python -m tests.integration.test_weights_minilm_model [calibration] [evaluation]`` prints the table.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from builder.verify.accumulator import AccumulatorSpec, verify_model
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
from tests.integration.test_weights_minilm import (
    Gemm,
    _embeddings,
    _fake_quant,
    _texts,
    batches_of_rows,
    weight_gemms,
)
from tests.integration.test_weights_minilm import with_weights as _with_weights

Stats = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # input -> (OPTQ H, GPFQ H~, GPFQ G)
Quantizer = Callable[[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]], QuantizedWeight]
AXE16 = AccumulatorTarget(accumulator_bits=16, activation_bits=8, signed_inputs=True, tile=128)


def collect(model_path: Path, texts: list[str], amax: dict[str, float] | None) -> Stats:
    """Streaming statistics of every GEMM input (A8 when ``amax`` gives the per-tensor ranges)."""
    model = onnx.load(str(model_path))
    inputs = list(dict.fromkeys(g.input for g in weight_gemms(model)))
    hess: dict[str, HessianObserver] = {}
    pair: dict[str, GpfqObserver] = {}
    for batch in batches_of_rows(model_path, inputs, texts):
        for name, rows in batch.items():
            quant = rows if amax is None else _fake_quant(rows, amax[name])
            hess.setdefault(name, HessianObserver(rows.shape[1])).update(quant)
            pair.setdefault(name, GpfqObserver(rows.shape[1])).update(quant, rows)
    return {name: (hess[name].matrix(), *pair[name].matrices()) for name in inputs}


def input_ranges(model_path: Path, texts: list[str]) -> dict[str, float]:
    model = onnx.load(str(model_path))
    inputs = list(dict.fromkeys(g.input for g in weight_gemms(model)))
    amax: dict[str, float] = {}
    for batch in batches_of_rows(model_path, inputs, texts):
        for name, rows in batch.items():
            amax[name] = max(amax.get(name, 0.0), float(np.abs(rows).max()))
    return amax


def with_activation_qdq(model: onnx.ModelProto, gemms: list[Gemm], amax: dict[str, float]) -> onnx.ModelProto:
    """Per-tensor INT8 Q/DQ (scale amax / 127) in front of the activation input of each of ``gemms``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_node = {g.node: g for g in gemms}
    nodes = []
    for node in out.graph.node:
        gemm = by_node.get(node.name)
        if gemm is not None:
            base = f"{node.name}_act"
            out.graph.initializer.extend([
                numpy_helper.from_array(np.array(np.float32(amax[gemm.input] / 127)), f"{base}_scale"),
                numpy_helper.from_array(np.array(0, np.int8), f"{base}_zero")])
            nodes.append(helper.make_node("QuantizeLinear", [gemm.input, f"{base}_scale", f"{base}_zero"],
                                          [f"{base}_q"], name=f"{base}_Q"))
            nodes.append(helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero"],
                                          [f"{base}_dq"], name=f"{base}_DQ"))
            node.input[0] = f"{base}_dq"
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def quantize_model(model: onnx.ModelProto, stats: Stats, quantizer: Quantizer) -> dict[str, QuantizedWeight]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {g.weight: quantizer(inits[g.weight], stats[g.input]) for g in weight_gemms(model)}


def methods(bits: int, block: int | None) -> dict[str, Quantizer]:
    static = block is not None
    return {
        "rtn-max": lambda w, s: rtn(w, RtnConfig(bits=bits, block=block)),
        "rtn-mse": lambda w, s: rtn(w, RtnConfig(bits=bits, block=block, scale_method=ScaleMethod.MSE)),
        "optq": lambda w, s: optq(w, s[0], OptqConfig(bits=bits, block=block)),
        "optq-actorder-mse": lambda w, s: optq(w, s[0], OptqConfig(bits=bits, block=block, act_order=True,
                                                                   static_block_scales=static,
                                                                   scale_method=ScaleMethod.MSE)),
        "gpfq": lambda w, s: gpfq(w, s[1], s[2], GpfqConfig(bits=bits, block=block)),
    }


def cosine(reference: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    c = np.sum(reference * other, axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))
    return float(c.mean()), float(c.min())


def measure(model_path: Path, calibration: int, evaluation: int,
            settings: tuple[str, ...] = ("A16", "A8")) -> list[tuple[str, str, float, float, str]]:
    """Rows (setting, method, mean cosine, min cosine, verifier note)."""
    model = onnx.load(str(model_path))
    calib_texts, eval_texts = _texts(calibration, evaluation)
    reference = _embeddings(model, eval_texts)
    rows = []
    stats16 = collect(model_path, calib_texts, None) if "A16" in settings else {}
    for bits, block in ((8, None), (4, None), (4, 128)) if "A16" in settings else ():
        for name, quantizer in methods(bits, block).items():
            fake = _with_weights(model, quantize_model(model, stats16, quantizer), as_integers=False)
            rows.append((f"W{bits}{'g' + str(block) if block else ''}A16", name,
                         *cosine(reference, _embeddings(fake, eval_texts)), ""))
    if "A8" not in settings:
        return rows
    amax = input_ranges(model_path, calib_texts)
    stats8 = collect(model_path, calib_texts, amax)
    spec = AccumulatorSpec(accumulator_bits=16, tile=128)
    gemms = weight_gemms(model)
    a8 = {f"{n}": q for n, q in methods(4, None).items() if n in ("rtn-max", "optq", "gpfq")}
    a8["axe-optq"] = lambda w, s: optq(w, s[0], OptqConfig(bits=4, accumulator=AXE16))
    a8["axe-gpfq"] = lambda w, s: gpfq(w, s[1], s[2], GpfqConfig(bits=4, accumulator=AXE16))
    a8["rtn-max W8"] = lambda w, s: rtn(w, RtnConfig(bits=8))
    a8["optq W8"] = lambda w, s: optq(w, s[0], OptqConfig(bits=8))
    for name, quantizer in a8.items():
        weights = quantize_model(model, stats8, quantizer)
        integer_graph = with_activation_qdq(_with_weights(model, weights, as_integers=True), gemms, amax)
        wide = name.endswith(" W8")
        report = verify_model(integer_graph, AccumulatorSpec(accumulator_bits=32) if wide else spec)
        note = (f"{'P=32' if wide else 'P=16 T=128'}: {'proved' if report.proved else 'overflow possible'} "
                f"({sum(g.overflowing for g in report.gemms)} tile-channels in "
                f"{sum(1 for g in report.gemms if g.overflowing)} GEMMs)")
        setting = "W8A8" if wide else "W4A8"
        mean, low = cosine(reference, _embeddings(integer_graph, eval_texts))
        rows.append((setting, name.removesuffix(" W8"), mean, low, note))
    return rows


@pytest.mark.slow
def test_optq_w4a8_beats_rtn_and_only_the_axe_graphs_are_proved(minilm_onnx: Path) -> None:
    rows = {(s, m): (mean, note) for s, m, mean, _, note in measure(minilm_onnx, 64, 64, settings=("A8",))}
    assert rows[("W4A8", "optq")][0] > rows[("W4A8", "rtn-max")][0] + 0.02
    assert rows[("W4A8", "gpfq")][0] > rows[("W4A8", "rtn-max")][0] + 0.02
    assert rows[("W8A8", "optq")][0] >= rows[("W8A8", "rtn-max")][0] - 1e-3
    assert "proved" in rows[("W4A8", "axe-optq")][1] and "proved" in rows[("W4A8", "axe-gpfq")][1]
    assert "overflow possible" in rows[("W4A8", "optq")][1] and "proved" in rows[("W8A8", "optq")][1]


if __name__ == "__main__":
    from builder.intake.minilm import ensure_minilm_onnx

    n_calib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    n_eval = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    chosen = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ("A16", "A8")
    print(f"| setting | method | cosine mean | cosine min | verifier |  (calibration {n_calib}, held-out {n_eval})")
    print("|---|---|---:|---:|---|")
    for setting, method, mean, low, note in measure(ensure_minilm_onnx(), n_calib, n_eval, chosen):
        print(f"| {setting} | {method} | {mean:.4f} | {low:.4f} | {note} |", flush=True)
