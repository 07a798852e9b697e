"""Evaluation stage: ``evaluate(fp32_model, model, report, data) -> AccuracyReport`` for any model.

Every compared float output of ``model`` is held against the FP32 reference on held-out data; the task
figures that apply are added (sentence encoders: probe, Spearman, embedding cosine; causal language models:
perplexity, next-token agreement and KL, greedy generation through the KV cache), and the report says why
the others were skipped. The FP32 side is a :class:`~builder.evaluate.reference.Reference`, computed once
(and cached on disk when a cache folder is given) and reused for every model evaluated against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from builder.evaluate.decoder import leading_agreement
from builder.evaluate.fidelity import FidelityAccumulator
from builder.evaluate.flops import gemm_costs, int8_gemm_share
from builder.evaluate.language import model_windows, reference_perplexity
from builder.evaluate.layers import layer_errors_on
from builder.evaluate.progress import Phases, Progress, peak_rss_mib
from builder.evaluate.reference import Reference, comparison_feeds, generate_all, prepare_reference
from builder.evaluate.report import AccuracyReport, Generation, LanguageFigures, OutputFidelity, SentenceFigures
from builder.evaluate.runner import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, OrtRunner
from builder.evaluate.sentence import reference_figures, sentence_figures
from builder.graph.report import GraphReport
from calib.errors import CalibrationError, ConfigError

__all__ = ["EvalData", "Reference", "evaluate", "load_eval_data", "prepare_reference", "reference_report"]

logger = logging.getLogger(__name__)

SHARE_SEQ_LENGTH = 128  # sequence length at which the INT8 GEMM-FLOP share is measured
LAYER_WINDOWS = 2  # perplexity windows used for a decoder's per-layer error table
AGREEMENT_WARNING = 0.80  # a quantized LM below this next-token agreement with FP32 gets a warning
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, there was a",
    "To be, or not to be, that is",
    "The best way to learn a new language is",
)


@dataclass(frozen=True, kw_only=True)
class EvalData:
    """Held-out data of one evaluation: probe sentences, rated pairs, comparison sentences, LM text settings."""

    train_texts: tuple[str, ...]
    train_labels: tuple[bool, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[bool, ...]
    pair_docs: tuple[str, ...]
    pairs: tuple[tuple[int, int, float], ...]
    layer_texts: tuple[str, ...]  # per-layer error table and output comparison (a subset of the test split)
    tokenizer_json: Path | None = None  # used when no encoder is given (None: found next to / for the model)
    batch_size: int = DEFAULT_BATCH_SIZE
    max_length: int = DEFAULT_MAX_LENGTH
    outputs: tuple[str, ...] = ()  # outputs to compare (empty: every float output)
    text_source: str = "shakespeare"  # LM text: lee, shakespeare or a file (its evaluation slice)
    window: int = 512
    windows: int = 8
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    new_tokens: int = 16

    def __post_init__(self) -> None:
        if len(self.train_texts) != len(self.train_labels) or len(self.test_texts) != len(self.test_labels):
            raise ConfigError("every probe sentence needs exactly one label")
        if not self.test_texts or not self.pair_docs or not self.pairs:
            raise CalibrationError("evaluation needs test sentences and rated pairs; got an empty set")
        overlap = set(self.train_texts) & set(self.test_texts)
        if overlap:
            raise CalibrationError(f"{len(overlap)} sentences are in both the probe train and test splits")
        if self.new_tokens < 1 or self.window < 2 or self.windows < 1:
            raise ConfigError(f"new tokens {self.new_tokens}, window {self.window} and windows {self.windows} "
                              "must be at least 1, 2 and 1")


def load_eval_data(
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    layer_sentences: int = 256,
    tokenizer_json: Path | None = None,
    **lm: Any,
) -> EvalData:
    """The VADER movie-sentence splits (calibration sentences excluded), the Lee rated pairs, and the
    language-model settings ``lm`` (``outputs``, ``text_source``, ``window``, ``windows``, ``prompts``,
    ``new_tokens``, ``batch_size``, ``max_length``; see :class:`EvalData`)."""
    from calib.data import lee_similarity_pairs, vader_splits

    splits = vader_splits(seed=seed)
    train = list(splits.train)[:train_limit]
    test = list(splits.test)[:test_limit]
    docs, pairs = lee_similarity_pairs()
    return EvalData(
        train_texts=tuple(s.text for s in train),
        train_labels=tuple(s.rating > 0 for s in train),
        test_texts=tuple(s.text for s in test),
        test_labels=tuple(s.rating > 0 for s in test),
        pair_docs=tuple(docs),
        pairs=tuple((int(i), int(j), float(r)) for i, j, r in pairs),
        layer_texts=tuple(s.text for s in test[:layer_sentences]),
        tokenizer_json=tokenizer_json,
        **lm,
    )


def share_feed(data: EvalData, reference: Reference) -> dict[str, npt.NDArray[Any]]:
    """One real batch of length ``SHARE_SEQ_LENGTH``: the first window (LMs), else the longest Lee document."""
    if reference.windows is not None:
        return reference.encoder.feed_from_ids(reference.windows.ids[:1, :SHARE_SEQ_LENGTH])
    return reference.encoder.encode([max(data.pair_docs, key=len)], SHARE_SEQ_LENGTH).feeds


def _layer_feeds(data: EvalData, reference: Reference) -> list[tuple[dict[str, npt.NDArray[Any]], Any]]:
    if reference.windows is not None:
        ids = reference.windows.ids[:LAYER_WINDOWS]
        return [(reference.encoder.feed_from_ids(w[None]), np.ones((1, ids.shape[1]), dtype=np.int64)) for w in ids]
    return comparison_feeds(reference.encoder, data)


def _encoder_outputs(runner: OrtRunner, ref: Reference, data: EvalData, progress: Phases,
                     name: str) -> tuple[OutputFidelity, ...]:
    accs = [FidelityAccumulator(name=o.name, kind=o.kind) for o in ref.survey.outputs]
    feeds = comparison_feeds(ref.encoder, data)
    names = [a.name for a in accs]
    with progress.phase(f"{name}: outputs on {len(data.layer_texts)} comparison sentences", total=len(feeds)) as step:
        for index, (feed, mask) in enumerate(feeds):
            for acc, value in zip(accs, runner.run(feed, names), strict=True):
                acc.add(value, ref.arrays[f"out/{acc.name}/{index}"], mask)
            step(1)
    return tuple(a.result() for a in accs)


def _language(runner: OrtRunner, ref: Reference, data: EvalData, progress: Phases,
              name: str) -> tuple[LanguageFigures, tuple[OutputFidelity, ...]]:
    assert ref.windows is not None and ref.survey.logits is not None
    accs = [FidelityAccumulator(name=o.name, kind=o.kind) for o in ref.survey.outputs]
    windows = ref.windows
    with progress.phase(f"{name}: {len(windows.ids)} perplexity windows", total=len(windows.ids),
                        unit="window") as step:
        lm = model_windows(runner, ref.survey, ref.encoder, windows, ref.arrays, accs, step)
    generations: list[Generation] = []
    check = None
    if ref.survey.present and data.prompts:
        runs, check = generate_all(runner, ref.survey, ref.encoder, data.prompts, data.new_tokens, progress, name)
        for prompt, run, expected in zip(data.prompts, runs, ref.generation, strict=True):
            generations.append(Generation(
                prompt=prompt, text=ref.encoder.decode(run.tokens), reference_text=ref.encoder.decode(expected),
                tokens=run.tokens, reference_tokens=expected, agreement=leading_agreement(run.tokens, expected)))
    figures = LanguageFigures(
        corpus=windows.corpus, window=int(windows.ids.shape[1]), windows=int(windows.ids.shape[0]),
        tokens=lm.count, perplexity=lm.perplexity(), reference_perplexity=lm.reference_perplexity(),
        top1_agreement=lm.top1_equal / lm.count, kl_mean=lm.kl_sum / lm.count, generation=tuple(generations),
        cache_check=check, reference_cache_check=ref.cache_check)
    return figures, tuple(a.result() for a in accs)


def _warnings(language: LanguageFigures | None, quantized: bool = False) -> list[str]:
    out = []
    if language is not None and language.top1_agreement < AGREEMENT_WARNING:
        out.append(f"next-token agreement with FP32 is {100 * language.top1_agreement:.1f}%, below "
                   f"{100 * AGREEMENT_WARNING:.0f}%: expect generations to diverge from FP32 within a few tokens")
    if language is not None and language.cache_check is not None and not language.cache_check.within:
        c = language.cache_check
        why = ("; expected in a Q/DQ graph, whose cached and full paths sum in another order and so round some "
               "activations at the Q nodes differently: judge it by the next-token agreement" if quantized else "")
        out.append(f"cached-path logits differ from the full sequence by {c.max_abs_diff:.3g} (FP32 tolerance "
                   f"{c.tolerance:.3g}){why}")
    return out


def _model_figures(
    model: onnx.ModelProto, ref: Reference, data: EvalData, refit: bool, progress: Phases, name: str
) -> tuple[list[str], tuple[OutputFidelity, ...], SentenceFigures | None, LanguageFigures | None]:
    """Outputs and task figures of ``model``; its session is released on return (one large session at a time)."""
    runner = OrtRunner(model)
    computed = ["outputs"]
    sentence = language = None
    if ref.survey.logits is not None:
        language, outputs = _language(runner, ref, data, progress, name)
        computed += ["perplexity", "next-token agreement", "KL"] + (["generation"] if language.generation else [])
    else:
        outputs = _encoder_outputs(runner, ref, data, progress, name)
    if ref.sentence is not None:
        sentence = sentence_figures(runner, ref.encoder, ref.sentence, data, refit, progress, name)
        computed += ["sentence embedding cosine", "probe", "Spearman"]
    return computed, outputs, sentence, language


def evaluate(
    fp32_model: onnx.ModelProto,
    model: onnx.ModelProto,
    report: GraphReport,
    data: EvalData,
    reference: Reference | None = None,
    name: str = "model",
    refit: bool = True,
    *,
    progress: Phases | None = None,
) -> AccuracyReport:
    """Accuracy of ``model`` against ``fp32_model`` on ``data`` (see :class:`AccuracyReport`)."""
    progress = progress or Progress()
    ref = prepare_reference(fp32_model, data, progress=progress) if reference is None else reference
    computed, outputs, sentence, language = _model_figures(model, ref, data, refit, progress, name)
    quantized = any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    with progress.phase(f"{name}: per-layer error", total=None):
        table, layer_warnings = layer_errors_on(fp32_model, model, report, _layer_feeds(data, ref))
    with progress.phase(f"{name}: INT8 GEMM share", total=None):
        share = int8_gemm_share(gemm_costs(model, share_feed(data, ref)))
    computed += ["INT8 GEMM share"] + (["per-layer error"] if table else [])
    warnings = _warnings(language, quantized)
    result = AccuracyReport(
        model_name=name, computed=tuple(computed), skipped=ref.survey.skipped, outputs=outputs, sentence=sentence,
        language=language, int8_gemm_share=share, layer_errors=table, peak_rss_mib=round(peak_rss_mib(), 1),
        warnings=tuple(layer_warnings) + tuple(warnings))
    for message in warnings:
        logger.warning("%s: %s", name, message)
    logger.info("%s: %s", name, result.headline())
    return result


def reference_report(fp32_model: onnx.ModelProto, data: EvalData, reference: Reference,
                     name: str = "fp32") -> AccuracyReport:
    """The FP32 model's own row (its task figures; agreement 1 by construction), without re-running it."""
    sentence = reference_figures(reference.sentence, data) if reference.sentence is not None else None
    language = None
    if reference.windows is not None:
        ppl, tokens = reference_perplexity(reference.arrays, len(reference.windows.ids))
        generations = tuple(
            Generation(prompt=p, text=reference.encoder.decode(t), reference_text=reference.encoder.decode(t),
                       tokens=t, reference_tokens=t, agreement=len(t))
            for p, t in zip(data.prompts, reference.generation, strict=False))
        language = LanguageFigures(
            corpus=reference.windows.corpus, window=int(reference.windows.ids.shape[1]),
            windows=int(reference.windows.ids.shape[0]), tokens=tokens, perplexity=ppl, reference_perplexity=ppl,
            top1_agreement=1.0, kl_mean=0.0, generation=generations, cache_check=reference.cache_check,
            reference_cache_check=reference.cache_check)
    computed = [c for c, present in (("sentence embedding cosine", sentence), ("probe", sentence),
                                     ("Spearman", sentence), ("perplexity", language)) if present is not None]
    return AccuracyReport(
        model_name=name, computed=(*computed, "INT8 GEMM share"), skipped=reference.survey.skipped,
        sentence=sentence, language=language,
        int8_gemm_share=int8_gemm_share(gemm_costs(fp32_model, share_feed(data, reference))),
        peak_rss_mib=round(peak_rss_mib(), 1))
