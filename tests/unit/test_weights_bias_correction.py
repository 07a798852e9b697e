"""Weight stage: empirical bias correction of INT8 weight GEMMs on calibration data.

The corrected biases are compared with an independent NumPy computation (fake-quantized input and
per-channel weight, mean over the non-padding calibration tokens), and the corrected model's GEMM+bias
outputs are checked to have the FP32 model's per-channel mean on the calibration data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from builder.graph.analyze import analyze
from builder.graph.report import GraphReport, Role
from builder.lower.pipeline import QuantizedModel
from builder.pipeline import quantize as pipeline_quantize
from builder.plan.artifact import load_plan
from builder.plan.planner import BIAS_CORRECTION_NOTE, plan
from builder.recipes.loader import load_preset, recipe_from_yaml
from builder.recipes.model import Recipe, Rule, Selector, Settings
from builder.weights.bias_correction import correct_biases, find_targets
from calib.errors import ConfigError
from calib.statistics import Statistics
from tests.toygraphs import bert_block_model
from tests.unit.test_lower import fake_quant
from tests.unit.test_plan import toy_statistics

Feeds = list[dict[str, np.ndarray]]
Toy = tuple[onnx.ModelProto, GraphReport, Statistics, Feeds]


def quantize(model: onnx.ModelProto, recipe: Recipe | str, stats: Statistics, *, report: GraphReport,
             calibration_feeds: Feeds | None = None) -> QuantizedModel:
    r = load_preset(recipe) if isinstance(recipe, str) else recipe
    return pipeline_quantize(model, report, r, stats, feeds=calibration_feeds).model


def calibration_feeds(sentences: int = 24) -> Feeds:
    from builder.intake.minilm import tokenizer_json_path
    from calib.data import vader_splits
    from calib.tokenize import encode

    texts = [s.text for s in vader_splits().calibration[:sentences]]
    return list(encode(texts, tokenizer_json_path(), max_length=32, batch_size=8))


@pytest.fixture(scope="module")
def toy() -> Toy:
    model = bert_block_model(layers=2, hidden=36, heads=2, ffn=72)
    report = analyze(model, name="toy_bert")
    return model, report, toy_statistics(model, report), calibration_feeds()


def corrected_recipe() -> Recipe:
    return load_preset("int8-gemm").with_rules((Rule(select=Selector(roles=(Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ,
                                                                               Role.ATTN_OUT, Role.FC1, Role.FC2)),
                                                     set=Settings(bias_correction=True)),))


def masked_mean(per_batch: list[np.ndarray], feeds: Feeds) -> np.ndarray:
    """Per-channel mean over the non-padding tokens of every batch (float64)."""
    rows = [values[f["attention_mask"] != 0] for values, f in zip(per_batch, feeds, strict=True)]
    return np.concatenate(rows).astype(np.float64).mean(axis=0)


def outputs_over(model: onnx.ModelProto, feeds: Feeds, tensors: list[str]) -> dict[str, list[np.ndarray]]:
    """Per-batch values of ``tensors`` (ONNX Runtime, one session)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [sess.run(tensors, f) for f in feeds]
    return {t: [r[i] for r in runs] for i, t in enumerate(tensors)}


def gemm_and_add(model: onnx.ModelProto, node_name: str) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    node = next(n for n in model.graph.node if n.name == node_name)
    add = next(n for n in model.graph.node if node.output[0] in n.input)
    return node, add


def bias_of(model: onnx.ModelProto, add: onnx.NodeProto) -> np.ndarray:
    inits = {t.name: t for t in model.graph.initializer}
    name = next(t for t in add.input if t in inits)
    return numpy_helper.to_array(inits[name]).astype(np.float64)


def test_recipe_setting_reaches_plan_and_rejects_bad_values(toy: Toy) -> None:
    model, report, table, _ = toy
    text = ("name: bc\nrules:\n  - select: {roles: [fc1, fc2]}\n    set: {precision: int8, bias_correction: true}\n")
    p = plan(report, recipe_from_yaml(text), table)
    fc = [n for n in p.nodes if n.role in ("fc1", "fc2")]
    assert fc and all(BIAS_CORRECTION_NOTE in n.reason for n in fc)
    assert set(p.bias_correction_nodes) == {n.node for n in fc}
    assert load_plan(p.to_json()) == p
    assert not plan(report, load_preset("int8-gemm"), table).bias_correction_nodes
    with pytest.raises(ConfigError, match="bias_correction"):
        recipe_from_yaml("name: bc\nrules:\n  - set: {bias_correction: 1}\n")
    with pytest.raises(ConfigError, match="bias_corection"):
        recipe_from_yaml("name: bc\nrules:\n  - set: {bias_corection: true}\n")
    with pytest.raises(ConfigError, match="calibration"):
        quantize(model, recipe_from_yaml(text), table, report=report)


def test_first_stage_biases_match_numpy_reference(toy: Toy) -> None:
    """Layer-0 Q/K/V read the embedding LayerNorm output, which no correction changes: their new biases are
    old bias - mean(fake_quant(x - c) @ fake_quant_per_channel(W) - x @ W) over the calibration tokens (the
    centering offset c that the lowering folded into the bias is part of what the correction measures)."""
    model, report, table, feeds = toy
    q = quantize(model, corrected_recipe(), table, report=report, calibration_feeds=feeds)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    acts = {a.tensor: a for a in q.plan.activations}
    checked = 0
    for role in (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ):
        a = report.find(role, 0)
        assert a is not None and a.weight is not None
        w = weights[a.weight].astype(np.float32)
        w_scale = (np.max(np.abs(w), axis=0) / np.float32(127)).astype(np.float32)
        w_q = (np.clip(np.rint(w / w_scale), -127, 127) * w_scale).astype(np.float32)
        x_runs = outputs_over(model, feeds, [a.inputs[0]])[a.inputs[0]]
        x_scale = np.float32(acts[a.inputs[0]].params.amax / 127)
        c = np.float32(acts[a.inputs[0]].params.offset)  # int8-gemm centers its inputs; the GEMM reads DQ(Q(x - c))
        shift = masked_mean([fake_quant(x - c, x_scale).astype(np.float64) @ w_q.astype(np.float64)
                             - x.astype(np.float64) @ w.astype(np.float64) for x in x_runs], feeds)
        _, add_fp = gemm_and_add(model, a.node)
        _, add_q = gemm_and_add(q.model, a.node)
        expected = bias_of(model, add_fp) - shift
        np.testing.assert_allclose(bias_of(q.model, add_q), expected, atol=2e-5, rtol=0)
        assert np.max(np.abs(shift)) > 1e-4  # the correction is not trivially zero
        checked += 1
    assert checked == 3


def test_correction_removes_mean_output_error_and_is_deterministic(toy: Toy) -> None:
    model, report, table, feeds = toy
    base = quantize(model, "int8-gemm", table, report=report)
    corrected = quantize(model, corrected_recipe(), table, report=report, calibration_feeds=feeds)
    targets = find_targets(corrected.model, corrected.plan.bias_correction_nodes)
    assert {t.node for t in targets} == set(corrected.plan.bias_correction_nodes)  # every toy GEMM is MatMul+Add
    assert len({t.stage for t in targets}) == 8  # per layer: Q/K/V, attention output, FC1, FC2... in sequence
    adds = [t.add for t in targets]
    add_out = {n.name: n.output[0] for n in corrected.model.graph.node if n.name in adds}
    tensors = [add_out[a] for a in adds]
    ref = outputs_over(model, feeds, tensors)
    before = outputs_over(base.model, feeds, tensors)
    after = outputs_over(corrected.model, feeds, tensors)
    for t in tensors:
        mean_ref = masked_mean(ref[t], feeds)
        err_before = masked_mean(before[t], feeds) - mean_ref
        err_after = masked_mean(after[t], feeds) - mean_ref
        assert np.max(np.abs(err_after)) < 1e-5 + 0.02 * np.max(np.abs(err_before)), t
    direct, _ = correct_biases(model, base.model, feeds, nodes=corrected.plan.bias_correction_nodes)
    assert direct.SerializeToString(deterministic=True) == corrected.serialize()
    again = quantize(model, corrected_recipe(), table, report=report, calibration_feeds=feeds)
    assert again.serialize() == corrected.serialize()
    assert corrected.serialize() != base.serialize()


def test_quantize_cli_corrects_biases_with_calibration_flags(toy: Toy, tmp_path: Path) -> None:
    from builder.cli.main import main

    model, _, stats, _ = toy
    from builder.intake.minilm import tokenizer_json_path

    model_path, recipe = tmp_path / "toy.onnx", tmp_path / "bc.yaml"
    onnx.save(model, str(model_path))
    shutil.copy(tokenizer_json_path(), tmp_path / "tokenizer.json")  # the toy's vocabulary is BERT's
    stats.save(tmp_path / "statistics.npz")
    recipe.write_text("name: bc\nrules:\n  - select: {roles: [q_proj, k_proj, v_proj, attn_out, fc1, fc2]}\n"
                      "    set: {precision: int8, bias_correction: true}\n")
    args = ["quantize", str(model_path), "--statistics", str(tmp_path), "--samples", "16", "--max-length", "32"]
    assert main([*args, "--recipe", str(recipe), "-o", str(tmp_path / "bc")]) == 0
    assert main([*args, "--recipe", "int8-gemm", "-o", str(tmp_path / "plain")]) == 0
    plan_bc = load_plan((tmp_path / "bc" / "plan.json").read_text())
    assert len(plan_bc.bias_correction_nodes) == 12
    corrected, plain = onnx.load(str(tmp_path / "bc" / "model.onnx")), onnx.load(str(tmp_path / "plain" / "model.onnx"))
    targets = find_targets(corrected, plan_bc.bias_correction_nodes)
    changed = [t for t in targets if not np.array_equal(bias_of(corrected, gemm_and_add(corrected, t.node)[1]),
                                                        bias_of(plain, gemm_and_add(plain, t.node)[1]))]
    assert len(changed) == 12
