"""SPARQ on real MiniLM activations: the ONNX composition and the Triton kernel equal calib.sparq bit for bit.

The activations are two weight-GEMM inputs of the bundled all-MiniLM-L6-v2 export on VADER calibration
sentences: the first (the embedding LayerNorm output feeding Q/K/V, K = 384) and the first FC2 input (the GELU
output, K = 1536, where vSPARQ finds zeros). Each is quantized per tensor with the scale of its observed max
(padding tokens excluded), as a static INT8 recipe would. The slow test measures the accuracy effect.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.lower.sparq_ops import sparq_nodes
from calib.quant import quantize, scale_from_amax
from calib.sparq import Rounding, SparqConfig, sparq_fake_quant, sparq_int8, zero_pair_counts

LOG = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
CONFIGS = {
    "b4-5opt": SparqConfig(window_bits=4),
    "b4-3opt-trunc": SparqConfig(window_bits=4, placements=3, rounding=Rounding.TRUNCATE),
    "v4-5opt": SparqConfig(window_bits=4, vsparq=True),
    "v2-trunc": SparqConfig(window_bits=2, rounding=Rounding.TRUNCATE, vsparq=True),
    "v3": SparqConfig(window_bits=3, vsparq=True),
}


def weight_gemm_inputs(model: onnx.ModelProto) -> list[str]:
    """Activation inputs of the MatMuls whose second input is a weight initializer, once each, in graph order."""
    weights = {i.name for i in model.graph.initializer}
    seen: list[str] = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] not in seen:
            seen.append(node.input[0])
    return seen


def reduction_size(model: onnx.ModelProto, tensor: str) -> int:
    weights = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] == tensor)
    return int(weights[node.input[1]].dims[0])


def feeds(texts: list[str]) -> Iterator[dict[str, np.ndarray]]:
    from builder.intake.minilm import tokenizer_json_path
    from calib.tokenize import encode

    yield from encode(texts, tokenizer_json_path(), max_length=128, batch_size=16, sort_by_length=True)


def run_with_outputs(model: onnx.ModelProto, names: list[str], texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Run ``model`` with ``names`` exposed as extra outputs; per batch: those tensors and the attention mask."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names
                                if n not in known)
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    batches = []
    for feed in feeds(texts):
        values = session.run(names, feed)
        batches.append({**dict(zip(names, values, strict=True)), "mask": feed["attention_mask"].astype(bool)})
    return batches


@pytest.fixture(scope="module")
def minilm(minilm_onnx: Path) -> onnx.ModelProto:
    return onnx.load(str(minilm_onnx))


@pytest.fixture(scope="module")
def activations(minilm: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.float32]]:
    """name -> (activation [B, S, K] float32, attention mask [B, S], per-tensor scale from the observed max)."""
    from calib.data import calibration_texts

    inputs = weight_gemm_inputs(minilm)
    chosen = [inputs[0], next(t for t in inputs if reduction_size(minilm, t) == 1536)]
    [batch] = run_with_outputs(minilm, chosen, calibration_texts("vader", 16))
    out = {}
    for name in chosen:
        x = batch[name]
        out[name] = (x, batch["mask"], scale_from_amax(float(np.max(np.abs(x[batch["mask"]])))))
    return out


def qdq_sparq_model(config: SparqConfig, k: int, scale: np.float32) -> onnx.ModelProto:
    """x -> QuantizeLinear -> composition -> (codes, DequantizeLinear)."""
    nodes, inits = sparq_nodes("x_q", "codes", "x/sparq", config, reduction_size=k)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]), *nodes,
         helper.make_node("DequantizeLinear", ["codes", "s", "z"], ["y"])],
        "qdq_sparq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
        [helper.make_tensor_value_info("codes", TensorProto.INT8, ["b", "s", k]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", k])],
        [numpy_helper.from_array(np.array(scale), "s"), numpy_helper.from_array(np.array(0, np.int8), "z"), *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_composition_equals_reference_on_minilm_gemm_inputs(
        activations: dict[str, tuple[np.ndarray, np.ndarray, np.float32]], config_name: str) -> None:
    config = CONFIGS[config_name]
    for name, (x, mask, scale) in activations.items():
        k = x.shape[-1]
        session = ort.InferenceSession(qdq_sparq_model(config, k, scale).SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        codes, y = session.run(None, {"x": x})
        plain = quantize(x, scale)
        want = sparq_int8(plain, config)
        assert np.array_equal(codes, want), f"{name}: {int(np.sum(codes != want))} codes differ"
        np.testing.assert_array_equal(y, sparq_fake_quant(x, float(scale), config))
        changed = float(np.mean(want[mask] != plain[mask]))
        LOG.info("%s %s: %.1f%% of codes trimmed", config.label(), name, 100 * changed)
        assert changed > 0  # real data exercise the windows (thousands of codes even at 0.1%)


def test_zero_pairs_on_minilm(activations: dict[str, tuple[np.ndarray, np.ndarray, np.float32]]) -> None:
    (qkv_name, (qkv, qkv_mask, qkv_scale)), (fc2_name, (fc2, fc2_mask, fc2_scale)) = activations.items()
    fc2_counts = zero_pair_counts(quantize(fc2, fc2_scale), fc2_mask)
    qkv_counts = zero_pair_counts(quantize(qkv, qkv_scale), qkv_mask)
    tokens = int(fc2_mask.sum())
    assert fc2_counts.pairs == tokens * 1536 // 2 and qkv_counts.pairs == tokens * 384 // 2
    LOG.info("zero pairs: %s %.3f, %s %.3f", fc2_name, fc2_counts.zero_share, qkv_name, qkv_counts.zero_share)
    assert fc2_counts.zero_share > qkv_counts.zero_share  # GELU output: many codes round to zero


def _run_kernel_cases(npz: str) -> None:
    import torch

    from plugins.sparq_quant.kernel import sparq_quantize
    from plugins.sparq_quant.reference import sparq_quantize as reference

    data = np.load(npz)
    out = {}
    for key in sorted({k.rsplit(":", 1)[0] for k in data.files}):
        x, scale = data[f"{key}:x"], float(data[f"{key}:scale"])
        for config_name, config in CONFIGS.items():
            got = sparq_quantize(torch.from_numpy(x), scale=scale, config=config, block=8192).numpy()
            out[f"{key}/{config_name}"] = int(np.sum(got != reference(x, scale=scale, config=config)))
    print(json.dumps(out))


def test_kernel_equals_reference_on_minilm_gemm_inputs(
        activations: dict[str, tuple[np.ndarray, np.ndarray, np.float32]], tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="kernel tests need triton")
    pytest.importorskip("torch", reason="the triton interpreter runs on torch CPU tensors")
    arrays: dict[str, Any] = {}
    for i, (x, _, scale) in enumerate(activations.values()):
        arrays[f"t{i}:x"], arrays[f"t{i}:scale"] = x, np.array(scale)
    np.savez(tmp_path / "acts.npz", **arrays)
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="0")
    code = f"import tests.integration.test_sparq_minilm as m; m._run_kernel_cases({str(tmp_path / 'acts.npz')!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mismatches = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(mismatches) == len(activations) * len(CONFIGS)
    assert mismatches == dict.fromkeys(mismatches, 0)


# --- accuracy effect: SPARQ at every weight-GEMM input of MiniLM (weights FP32), cosine to FP32 ---------------


def insert_fake_quant(model: onnx.ModelProto, tensor: str, scale: np.float32, *,
                      sparq: SparqConfig | None = None, k: int = 0, clip: tuple[int, int] | None = None) -> None:
    """Q -> (SPARQ composition | Clip to a 4-bit grid | nothing) -> DQ in front of every reader of ``tensor``."""
    tag = tensor.strip("/").replace("/", "_")
    nodes = [helper.make_node("QuantizeLinear", [tensor, f"{tag}/s", f"{tag}/z"], [f"{tag}/q"])]
    inits = [numpy_helper.from_array(np.array(scale), f"{tag}/s"), numpy_helper.from_array(np.array(0, np.int8),
                                                                                           f"{tag}/z")]
    codes = f"{tag}/q"
    if sparq is not None:
        extra = sparq_nodes(codes, f"{tag}/t", f"{tag}/sparq", sparq, reduction_size=k)
        nodes += extra.nodes
        inits += extra.initializers
        codes = f"{tag}/t"
    elif clip is not None:
        inits += [numpy_helper.from_array(np.array(v, np.int8), f"{tag}/{n}") for n, v in zip("lh", clip, strict=True)]
        nodes.append(helper.make_node("Clip", [codes, f"{tag}/l", f"{tag}/h"], [f"{tag}/c"]))
        codes = f"{tag}/c"
    nodes.append(helper.make_node("DequantizeLinear", [codes, f"{tag}/s", f"{tag}/z"], [f"{tag}/dq"]))
    readers = [i for i, n in enumerate(model.graph.node) if tensor in n.input]
    for i in readers:
        node = model.graph.node[i]
        node.input[:] = [f"{tag}/dq" if name == tensor else name for name in node.input]
    for offset, node in enumerate(nodes):
        model.graph.node.insert(readers[0] + offset, node)
    model.graph.initializer.extend(inits)


def _a4_scale(values: np.ndarray) -> np.float32:
    """Per-tensor symmetric 4-bit scale ([-8, 7]) with the clipping range of least squared error (grid search
    over 2%..100% of the max on a fixed subsample of 2**17 values: the MSE range method applied to 4 bits)."""
    amax = float(np.max(np.abs(values)))
    flat = values.reshape(-1)
    if flat.size > 1 << 17:
        flat = flat[np.random.default_rng(0).choice(flat.size, 1 << 17, replace=False)]
    best, best_err = np.float32(amax / 7), np.inf
    for ratio in np.linspace(0.02, 1.0, 50):
        s = np.float32(ratio * amax / 7)
        err = float(np.mean((np.clip(np.rint(flat / s), -8, 7) * s - flat) ** 2))
        if err < best_err:
            best, best_err = s, err
    return best


def _cosines(model: onnx.ModelProto, reference: np.ndarray, texts: list[str]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    emb = np.concatenate([session.run(["sentence_embedding"], f)[0] for f in feeds(texts)])
    num = np.sum(emb * reference, axis=1)
    return np.asarray(num / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1)))


@pytest.mark.slow
def test_sparq_beats_plain_4bit_activations_on_minilm(minilm: onnx.ModelProto) -> None:
    from calib.data import vader_splits

    splits = vader_splits(seed=0, calibration=64)
    calibration = [s.text for s in splits.calibration]
    held_out = [s.text for s in splits.train[:192]]  # calibration-side held-out sentences, never the test split
    tensors = weight_gemm_inputs(minilm)
    batches = run_with_outputs(minilm, tensors, calibration)
    scales, a4_scales = {}, {}
    for t in tensors:
        valid = np.concatenate([b[t][b["mask"]] for b in batches])
        scales[t] = scale_from_amax(float(np.max(np.abs(valid))))
        a4_scales[t] = _a4_scale(valid)
    fp32 = np.concatenate([r["sentence_embedding"] for r in run_with_outputs(minilm, ["sentence_embedding"],
                                                                              held_out)])
    variants: dict[str, dict[str, Any]] = {
        "int8": {}, "sparq-b4": {"sparq": SparqConfig(window_bits=4)},
        "sparq-v4": {"sparq": SparqConfig(window_bits=4, vsparq=True)}, "a4-mse": {"clip": (-8, 7)},
    }
    means = {}
    for name, options in variants.items():
        model = onnx.ModelProto()
        model.CopyFrom(minilm)
        for t in tensors:
            scale = a4_scales[t] if "clip" in options else scales[t]
            insert_fake_quant(model, t, scale, k=reduction_size(minilm, t), **options)
        means[name] = float(np.mean(_cosines(model, fp32, held_out)))
    LOG.info("MiniLM cosine to FP32 (activations only, %d tensors, %d sentences): %s", len(tensors), len(held_out),
             json.dumps(means))
    assert means["int8"] > means["sparq-v4"] > means["sparq-b4"] > means["a4-mse"]
