"""Graph analysis on the real all-MiniLM-L6-v2 export: 6 post-LN layers, each with the full set of roles."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from builder.cli.main import main
from builder.graph.analyze import analyze
from builder.graph.load import load_model
from builder.graph.report import GraphReport, Role

BERT_LAYER_ROLES = {
    Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ, Role.ATTN_QK, Role.ATTN_SOFTMAX, Role.ATTN_PV, Role.ATTN_OUT,
    Role.ATTN_RESIDUAL, Role.ATTN_LN, Role.FC1, Role.FFN_ACT, Role.FC2, Role.FFN_RESIDUAL, Role.FFN_LN,
}


@pytest.fixture(scope="module")
def minilm_model(minilm_onnx: Path) -> onnx.ModelProto:
    return load_model(minilm_onnx)


@pytest.fixture(scope="module")
def minilm_report(minilm_model: onnx.ModelProto) -> GraphReport:
    return analyze(minilm_model, name="all-MiniLM-L6-v2")


def test_six_post_ln_layers_each_with_every_role_once(minilm_report: GraphReport) -> None:
    assert minilm_report.architecture == "bert"
    assert minilm_report.num_layers == 6
    assert minilm_report.hidden_size == 384
    assert minilm_report.warnings == ()
    for layer in range(6):
        roles = [a.role for a in minilm_report.in_layer(layer)]
        assert sorted(roles) == sorted(BERT_LAYER_ROLES), f"layer {layer}: {roles}"
    outside = [(a.role, a.layer) for a in minilm_report.assignments if a.layer is None]
    assert outside == [(Role.EMBED_LN, None)]


def test_layers_follow_the_residual_stream(minilm_report: GraphReport) -> None:
    """Each layer's projections read the previous layer's output LayerNorm (the embedding LN for layer 0)."""
    previous = minilm_report.by_role(Role.EMBED_LN)[0]
    for layer in range(6):
        for role in (Role.Q_PROJ, Role.K_PROJ, Role.V_PROJ):
            proj = minilm_report.find(role, layer)
            assert proj is not None and proj.inputs == previous.outputs
        ffn_ln = minilm_report.find(Role.FFN_LN, layer)
        assert ffn_ln is not None
        previous = ffn_ln
    assert previous.outputs == ("last_hidden_state",)  # the last block's output LN is the model output


def test_weights_are_initializers_with_output_channel_axis(
    minilm_model: onnx.ModelProto, minilm_report: GraphReport
) -> None:
    shapes = {t.name: tuple(t.dims) for t in minilm_model.graph.initializer}
    expected_out = {Role.Q_PROJ: 384, Role.K_PROJ: 384, Role.V_PROJ: 384, Role.ATTN_OUT: 384, Role.FC1: 1536,
                    Role.FC2: 384}
    gemms = [a for a in minilm_report.assignments if a.weight is not None]
    assert len(gemms) == 6 * 6
    for a in gemms:
        assert a.op_type == "MatMul" and a.weight_axis == 1
        assert shapes[a.weight][1] == expected_out[a.role]
    act = minilm_report.find(Role.FFN_ACT, 0)
    assert act is not None and act.op_type == "Gelu(decomposed)" and len(act.members) == 5


def test_cli_writes_a_report_that_round_trips(minilm_onnx: Path, minilm_report: GraphReport, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["analyze", str(minilm_onnx), "--name", "all-MiniLM-L6-v2", "--json", str(out)]) == 0
    assert GraphReport.from_json(out.read_text()) == minilm_report
    printed = capsys.readouterr().out
    assert "architecture bert" in printed and "6 layers" in printed
    assert printed.count("fc2") == 6
