"""Graph analysis on real exporter output: tiny Hugging Face BERT and GPT-2 models exported by torch.

The models are built from small configs (untrained weights: only the graph structure matters here). Opset 17
keeps ``LayerNormalization``; opset 14 makes the exporter decompose every LayerNorm into
ReduceMean/Sub/Pow/Sqrt/Div, so both forms are checked on exactly what a real exporter writes. GPT-2's Conv1D
layers export as ``Gemm`` (transB=0) with a fused QKV projection and a tanh-GELU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest

from builder.graph.analyze import analyze
from builder.graph.load import load_model
from builder.graph.report import GraphReport, Role

pytestmark = pytest.mark.slow

LAYERS, HIDDEN, HEADS, FFN = 2, 64, 4, 128
BERT_ROLES = {
    Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_QK, Role.ATTN_SOFTMAX, Role.ATTN_PV, Role.ATTN_OUT,
    Role.ATTN_RESIDUAL, Role.ATTN_LN, Role.FC1, Role.FFN_ACT, Role.FC2, Role.FFN_RESIDUAL, Role.FFN_LN,
}
GPT_ROLES = (BERT_ROLES - {Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ}) | {Role.QKV}


def _export(arch: str, opset: int, path: Path) -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "bert":
        config: Any = transformers.BertConfig(
            vocab_size=500, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=64,
        )
        body = transformers.BertModel(config, add_pooling_layer=False)
    else:
        config = transformers.GPT2Config(vocab_size=500, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                         n_positions=64, use_cache=False)
        body = transformers.GPT2Model(config)
    config._attn_implementation = "eager"  # attention as MatMul/Softmax, not a fused SDPA op

    class Wrapper(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, ids: Any, mask: Any) -> Any:
            return self.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state

    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]], dtype=torch.int64)
    with torch.no_grad():
        torch.onnx.export(
            Wrapper().eval(), (ids, (ids != 0).to(torch.int64)), str(path), input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"], opset_version=opset, dynamo=False,
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        )
    return load_model(path)


CASES = [("bert", 17), ("bert", 14), ("gpt2", 17), ("gpt2", 14)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-opset{o}" for a, o in CASES])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, int, onnx.ModelProto]:
    arch, opset = request.param
    model = _export(arch, opset, tmp_path_factory.mktemp(arch) / f"{arch}-{opset}.onnx")
    return arch, opset, model


def test_every_layer_has_the_full_set_of_roles(exported: tuple[str, int, onnx.ModelProto]) -> None:
    arch, opset, model = exported
    report: GraphReport = analyze(model, name=f"{arch}-{opset}")
    assert report.architecture == ("bert" if arch == "bert" else "gpt")
    assert (report.num_layers, report.hidden_size, report.warnings) == (LAYERS, HIDDEN, ())
    for layer in range(LAYERS):
        roles = sorted(a.role for a in report.in_layer(layer))
        assert roles == sorted(BERT_ROLES if arch == "bert" else GPT_ROLES), f"layer {layer}: {roles}"
    outside = [a.role for a in report.assignments if a.layer is None]
    assert outside == ([Role.EMBED_LN] if arch == "bert" else [Role.FINAL_LN])
    norms = [a for a in report.assignments if a.role in (Role.EMBED_LN, Role.ATTN_LN, Role.FFN_LN, Role.FINAL_LN)]
    expected_op = "LayerNormalization" if opset >= 17 else "LayerNorm(decomposed)"
    assert {a.op_type for a in norms} == {expected_op}


def test_weight_axes_match_the_output_features(exported: tuple[str, int, onnx.ModelProto]) -> None:
    arch, _, model = exported
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    out_features = {Role.QKV: 3 * HIDDEN, Role.FC1: FFN}
    report = analyze(model)
    gemms = [a for a in report.assignments if a.weight is not None]
    assert len(gemms) == LAYERS * (6 if arch == "bert" else 4)
    for a in gemms:
        assert a.op_type == ("MatMul" if arch == "bert" else "Gemm")
        assert shapes[a.weight][a.weight_axis] == out_features.get(a.role, HIDDEN)  # type: ignore[index]
