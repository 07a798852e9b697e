"""Architectures outside the matrix that each broke a stage once (tests/models.py ZOO), end to end, plus the check
of what broke: ALBERT's shared weights lower, DeBERTa's merged [batch*heads, S, S] tensors exclude their padding,
OPT's flattened residual stream is compared per layer, GPT-NeoX's parallel MLP gets its FFN roles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.graph.report import Role
from calib.layout import TensorLayout
from tests.models import ZOO, model_path
from tests.stages import StagesRun, every_stage


@pytest.fixture(scope="module", params=sorted(ZOO))
def run(request: pytest.FixtureRequest, bpe256: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> tuple[str, StagesRun]:
    name = str(request.param)
    return name, every_stage(model_path(name), name, bpe256, tmp_path_factory.mktemp(name))


def test_every_stage_and_what_once_broke(run: tuple[str, StagesRun]) -> None:
    name, stages = run
    report, statistics = stages.report, stages.statistics
    if name == "albert":  # one weight per role serves both layers
        q = [a for a in report.assignments if a.role == Role.Q_PROJ]
        assert len(q) == 2 and q[0].weight == q[1].weight
        assert {w.node for w in stages.result.plan.weights} >= {a.node for a in q}
    if name == "deberta-v2":
        merged = {n: lay for n, lay in statistics.meta.layouts.items() if lay.batch_group > 1}
        assert merged and all(lay.batch_group == ZOO[name].heads for lay in merged.values())
        scores = next(n for n, lay in merged.items() if lay == TensorLayout(token_axes=(1, -1), batch_group=4))
        # every head's query x key pairs of the valid tokens only: sum over texts of heads * length^2
        lengths = np.concatenate([np.asarray(f["attention_mask"]).sum(axis=1) for f in stages.feeds])
        assert statistics.tensors[scores].observers["minmax"].count == ZOO[name].heads * int(np.sum(lengths ** 2))
    if name == "opt":
        assert any(row.relative_error is not None for row in stages.accuracy.layer_errors)
    if name == "bert-cls":  # the pooler and the classifier: a task head, quantized, and no warning
        heads = [a for a in report.assignments if a.role == Role.GEMM]
        assert len(heads) == 2 and report.warnings == ()
        assert {a.node for a in heads} <= {w.node for w in stages.result.plan.weights}
    if name in ("gemma2", "cohere"):  # soft-capped scores found as attention; the second parallel Add joins the block
        for layer in range(ZOO[name].layers):
            roles = {a.role for a in report.in_layer(layer)}
            assert {Role.ATTN_QK, Role.ATTN_SOFTMAX, Role.ATTN_PV, Role.GATE_PROJ, Role.UP_PROJ, Role.FC2} <= roles
    if name == "gpt-neox":
        spec = ZOO[name]
        assert (report.num_heads, report.num_kv_heads, report.head_dim) == (spec.heads, spec.heads, spec.head_dim)
        # one residual Add per parallel block: reported as the block point, and no attention point
        assert {(row.layer, row.point) for row in stages.accuracy.layer_errors
                if row.relative_error is not None} == {(layer, "block") for layer in range(spec.layers)}
        for layer in range(ZOO[name].layers):
            roles = {a.role for a in report.in_layer(layer)}
            assert {Role.FFN_LN, Role.FC1, Role.FFN_ACT, Role.FC2, Role.QKV, Role.ATTN_OUT} <= roles



@pytest.mark.parametrize("keep_io_types", [True, False])
def test_a_float16_export_goes_through_every_stage(keep_io_types: bool, bpe256: Path, tmp_path: Path) -> None:
    """BERT converted to float16 (ONNX Runtime's converter, with and without float32 inputs/outputs) is computed
    in float32 from intake on, and quantizes like the float32 export."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(onnx.load(str(model_path("bert-eager"))), keep_io_types=keep_io_types)
    path = tmp_path / "bert-fp16.onnx"
    onnx.save(half, str(path))
    stages = every_stage(path, "bert-fp16", bpe256, tmp_path)
    assert stages.report.architecture == "bert" and stages.report.num_layers == 2


@pytest.mark.parametrize("name", ["gpt-neox", "opt"])
def test_the_kv_cache_export_of_configs_without_key_value_heads_matches_pytorch(name: str, tmp_path: Path) -> None:
    """builder.intake.decoder.export_causal_lm on configs that name no key/value heads (one per attention head)
    gives the KV-cache graph, which matches PyTorch on a prefill and a cached decode step."""
    from builder.intake.decoder import check_decoder, export_causal_lm
    from tests.models import torch_module

    spec = ZOO[name]
    module = torch_module(spec)
    path = tmp_path / "model.onnx"
    export_causal_lm(module, path)

    def tokenize(text: str) -> dict[str, list[int]]:  # character codes inside the 256-id vocabulary
        return {"input_ids": [5 + ord(c) % (spec.vocab - 5) for c in text]}

    check = check_decoder(module, tokenize, path, ["the cache holds keys", "and values per layer"])
    assert check.prefill_max_abs_diff <= 1e-4 * max(1.0, check.logits_max_abs)
    assert check.decode_max_abs_diff <= 1e-4 * max(1.0, check.logits_max_abs)


def test_every_preset_quantizes_every_zoo_model(run: tuple[str, StagesRun]) -> None:
    """Each preset resolves on the model's roles and lowers to a graph ONNX Runtime runs, with outputs close to
    FP32 (hero-m3 once refused ALBERT: its embedding projection wanted another scale for an FWQ LayerNorm output;
    every role-based preset once refused GPT-NeoX)."""
    import onnxruntime as ort

    from builder.intake.prepare import prepare_model
    from builder.pipeline import quantize, resolve_recipe
    from builder.recipes.loader import preset_names

    name, stages = run
    model = prepare_model(model_path(name)).model
    feed = stages.feeds[0]
    fp32 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = fp32.run(None, feed)[0]
    for preset in preset_names():
        result = quantize(model, stages.report, resolve_recipe(preset, stages.report), stages.statistics,
                          feeds=stages.feeds)
        session = ort.InferenceSession(result.model.serialize(), providers=["CPUExecutionProvider"])
        got = session.run(None, feed)[0]
        valid = np.asarray(feed["attention_mask"]).astype(bool)
        tokens = got.shape[:2] == valid.shape  # per-token outputs: padding left out; a classifier's [batch, labels]
        a, b = (got[valid], expected[valid]) if tokens else (got, expected)
        a, b = a.reshape(-1), b.reshape(-1)
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cosine > 0.9, (preset, cosine)
