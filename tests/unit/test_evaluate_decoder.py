"""Evaluation of any model: a tiny Llama KV-cache decoder (against PyTorch), a masked LM, a classifier head,
and the on-disk FP32 reference cache."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.evaluate.evaluate import EvalData, evaluate, load_eval_data, prepare_reference, reference_report
from builder.evaluate.fidelity import log_softmax
from builder.evaluate.render import format_accuracy
from builder.evaluate.runner import OrtRunner
from builder.evaluate.survey import survey
from builder.evaluate.tokenizer import model_text_encoder
from builder.graph.analyze import analyze
from builder.graph.report import GraphReport
from calib.text_encoder import TextEncoder
from tests.tiny_decoder import llama_module, tiny_llama
from tests.toygraphs import bert_block_model
from tests.unit.test_evaluate_runner import perturbed

PROMPTS = ("The prime minister said", "Police have arrested")


@pytest.fixture(scope="module")
def decoder() -> tuple[Path, onnx.ModelProto, TextEncoder, GraphReport]:
    path = tiny_llama()
    model = onnx.load(str(path))
    return path, model, model_text_encoder(path), analyze(model, name="tiny-llama")


@pytest.fixture(scope="module")
def lm_data() -> EvalData:
    return load_eval_data(train_limit=40, test_limit=40, layer_sentences=8, text_source="lee", window=64,
                          windows=3, prompts=PROMPTS, new_tokens=6)


def test_perplexity_and_generation_match_pytorch(decoder: Any, lm_data: EvalData) -> None:
    import torch

    _, model, encoder, _ = decoder
    reference = prepare_reference(model, lm_data, encoder=encoder)
    row = reference_report(model, lm_data, reference).language
    assert row is not None and reference.windows is not None
    torch_model = llama_module()
    ids = torch.from_numpy(reference.windows.ids)
    with torch.no_grad():
        logits = torch_model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert (row.window, row.windows, row.tokens) == (64, 3, 3 * 63)
    assert row.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-5)
    for prompt, tokens in zip(PROMPTS, reference.generation, strict=True):
        prompt_ids = torch.tensor([encoder.prompt_ids(prompt)])
        with torch.no_grad():
            out = torch_model.generate(prompt_ids, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                       attention_mask=torch.ones_like(prompt_ids))
        assert tuple(int(t) for t in out[0, prompt_ids.shape[1]:]) == tokens
    check = reference.cache_check
    assert check is not None and check.within and check.argmax_equal
    assert check.positions == sum(len(encoder.prompt_ids(p)) + 5 for p in PROMPTS)


def test_damaged_decoder_report(decoder: Any, lm_data: EvalData) -> None:
    _, model, encoder, report = decoder
    weight = next(i.name for i in model.graph.initializer if "mlp.down_proj" in i.name or i.name.startswith("onnx::"))
    damaged = perturbed(model, weight, scale=0.5)
    reference = prepare_reference(model, lm_data, encoder=encoder)
    result = evaluate(model, damaged, report, lm_data, reference, name="damaged")
    lm = result.language
    assert lm is not None and result.sentence is None
    assert 0.0 < lm.top1_agreement < 1.0 and lm.kl_mean > 0.0
    assert [s.figure for s in result.skipped] == ["sentence"]
    # perplexity from the damaged graph's own logits, computed here independently
    assert reference.windows is not None
    runner = OrtRunner(damaged)
    nll = []
    for window in reference.windows.ids:
        (logits,) = runner.run(encoder.feed_from_ids(window[None]), ["logits"])
        nll.extend(-log_softmax(logits[0, :-1])[np.arange(63), window[1:]])
    assert lm.perplexity == pytest.approx(math.exp(float(np.mean(nll))), rel=1e-9)
    assert {o.name for o in result.outputs} == {"logits", *(f"present.{i}.{k}" for i in range(2) for k in ("key",
                                                                                                       "value"))}
    assert len(lm.generation) == 2 and lm.cache_check is not None and lm.cache_check.within
    assert len(result.layer_errors) == 4 and all((e.relative_error or 0) > 0 for e in result.layer_errors[1:])
    text = format_accuracy(result)
    assert "perplexity" in text and "skipped sentence: a causal language model" in text


def test_reference_cache_is_reused_with_identical_figures(decoder: Any, lm_data: EvalData, tmp_path: Path) -> None:
    _, model, encoder, report = decoder
    first = prepare_reference(model, lm_data, encoder=encoder, cache_dir=tmp_path)
    second = prepare_reference(model, lm_data, encoder=encoder, cache_dir=tmp_path)
    assert not first.reused and second.reused and first.cache_file == second.cache_file
    assert first.cache_file is not None and first.cache_file.parent == tmp_path
    damaged = perturbed(model, model.graph.initializer[0].name, scale=0.1)
    a = evaluate(model, damaged, report, lm_data, first).to_dict()
    b = evaluate(model, damaged, report, lm_data, second).to_dict()
    a.pop("peak_rss_mib"), b.pop("peak_rss_mib")
    assert a == b
    other = prepare_reference(model, load_eval_data(train_limit=40, test_limit=40, layer_sentences=8,
                                                    text_source="lee", window=32, windows=2, prompts=PROMPTS,
                                                    new_tokens=6), encoder=encoder, cache_dir=tmp_path)
    assert not other.reused and other.cache_file != first.cache_file


def _with_head(name: str, width: int, pool: bool) -> onnx.ModelProto:
    """The toy BERT with a linear head: per token (``pool`` False: a masked-LM style 'logits') or mean-pooled."""
    model = bert_block_model(layers=1, hidden=32, heads=2, ffn=64, seed=3)
    g = model.graph
    w = (np.random.default_rng(0).standard_normal((32, width)) * 0.2).astype(np.float32)
    g.initializer.extend([numpy_helper.from_array(w, "head_w"), numpy_helper.from_array(np.array([1]), "ax")])
    source = "last_hidden_state"
    if pool:
        g.node.append(helper.make_node("ReduceSum", ["last_hidden_state", "ax"], ["pooled"], keepdims=0,
                                       name="head_pool"))
        source = "pooled"
    g.node.append(helper.make_node("MatMul", [source, "head_w"], [name], name="head_matmul"))
    g.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


def test_masked_lm_logits_are_not_a_language_model() -> None:
    from builder.intake.minilm import tokenizer_json_path

    model = _with_head("logits", 30522, pool=False)
    encoder = model_text_encoder(model, tokenizer_json_path())
    found = survey(model, OrtRunner(model), encoder)
    assert found.logits is None and found.pooling is not None and found.pooling.output == "last_hidden_state"
    assert [s.figure for s in found.skipped] == ["perplexity"] and "not causal" in found.skipped[0].reason


def test_classifier_head_compares_outputs_and_says_why_task_figures_are_skipped() -> None:
    from builder.intake.minilm import tokenizer_json_path

    model = _with_head("scores", 3, pool=True)
    model.graph.output.pop(0)  # only the head: no hidden state to pool
    data = load_eval_data(train_limit=40, test_limit=40, layer_sentences=8, outputs=("scores",),
                          tokenizer_json=tokenizer_json_path())
    damaged = perturbed(model, "head_w", scale=0.05)
    result = evaluate(model, damaged, analyze(model), data, name="classifier")
    assert result.sentence is None and result.language is None
    assert {s.figure for s in result.skipped} == {"perplexity", "sentence"}
    (scores,) = result.outputs
    assert scores.name == "scores" and scores.kind == "embedding" and scores.vectors == 8
    assert 0.5 < scores.cosine_mean < 1.0 and scores.relative_error > 0.0


def test_fp32_against_itself(decoder: Any, lm_data: EvalData) -> None:
    _, model, encoder, report = decoder
    result = evaluate(model, model, report, lm_data, prepare_reference(model, lm_data, encoder=encoder))
    lm = result.language
    assert lm is not None and lm.perplexity == lm.reference_perplexity and lm.top1_agreement == 1.0
    assert all(g.tokens == g.reference_tokens for g in lm.generation) and not result.warnings
    logits = next(o for o in result.outputs if o.name == "logits")
    # the stored reference logits are float16: exact argmax from float32, KL and error at float16 rounding
    assert logits.top1_agreement == 1.0 and logits.kl_mean is not None and logits.kl_mean < 1e-6
    assert logits.relative_error < 1e-3


def test_the_cache_warning_explains_itself_for_quantized_graphs() -> None:
    """The cached-vs-full warning fires for any graph past the FP32 tolerance; for a Q/DQ graph it says why a
    difference is expected and what to judge instead, and a check within tolerance gives no warning."""
    from builder.evaluate.evaluate import _warnings
    from builder.evaluate.report import CacheCheck, LanguageFigures

    def figures(diff: float) -> LanguageFigures:
        check = CacheCheck(positions=40, max_abs_diff=diff, max_abs_logit=30.0, tolerance=0.03,
                           within=diff <= 0.03, argmax_equal=diff <= 0.03)
        return LanguageFigures(corpus="c", window=8, windows=1, tokens=7, perplexity=10.0, reference_perplexity=9.9,
                               top1_agreement=0.9, kl_mean=0.01, cache_check=check)

    assert _warnings(figures(0.01), quantized=True) == []
    plain, quantized = _warnings(figures(1.5)), _warnings(figures(1.5), quantized=True)
    assert len(plain) == len(quantized) == 1 and "differ from the full sequence by 1.5" in plain[0]
    assert "Q/DQ" not in plain[0] and "Q/DQ graph" in quantized[0] and "next-token agreement" in quantized[0]
