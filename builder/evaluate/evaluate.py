"""Evaluation stage: ``evaluate(fp32_model, model, report, data) -> AccuracyReport``.

The FP32 side (embeddings of the probe's train and test sentences and of the Lee documents, the fitted probe)
is computed once as a :class:`Reference` and reused for every model evaluated against it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx

from builder.evaluate.flops import gemm_costs, int8_gemm_share
from builder.evaluate.layers import layer_errors
from builder.evaluate.metrics import Probe, fit_probe, row_cosine, similarity_spearman
from builder.evaluate.report import AccuracyReport
from builder.evaluate.runner import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, OrtRunner, batches, embed
from builder.graph.report import GraphReport
from calib.errors import CalibrationError, ConfigError

logger = logging.getLogger(__name__)

PAIR_MAX_LENGTH = 256  # the Lee documents are paragraphs; 256 is MiniLM's trained sequence length
SHARE_SEQ_LENGTH = 128  # sequence length at which the INT8 GEMM-FLOP share is measured


@dataclass(frozen=True, kw_only=True)
class EvalData:
    """Texts and labels of one evaluation: probe train/test sentences, rated document pairs, layer sentences."""

    train_texts: tuple[str, ...]
    train_labels: tuple[bool, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[bool, ...]
    pair_docs: tuple[str, ...]
    pairs: tuple[tuple[int, int, float], ...]
    layer_texts: tuple[str, ...]  # sentences for the per-layer error table (a subset of the test split)
    tokenizer_json: Path | None = None  # None: the bundled MiniLM tokenizer
    batch_size: int = DEFAULT_BATCH_SIZE
    max_length: int = DEFAULT_MAX_LENGTH

    def __post_init__(self) -> None:
        if len(self.train_texts) != len(self.train_labels) or len(self.test_texts) != len(self.test_labels):
            raise ConfigError("every probe sentence needs exactly one label")
        if not self.test_texts or not self.pair_docs or not self.pairs:
            raise CalibrationError("evaluation needs test sentences and rated pairs; got an empty set")
        overlap = set(self.train_texts) & set(self.test_texts)
        if overlap:
            raise CalibrationError(f"{len(overlap)} sentences are in both the probe train and test splits")


def load_eval_data(
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    layer_sentences: int = 256,
    tokenizer_json: Path | None = None,
) -> EvalData:
    """The VADER movie-sentence splits (calibration sentences excluded) and the Lee rated pairs."""
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
    )


@dataclass(frozen=True, kw_only=True)
class Reference:
    """FP32 embeddings and the FP32 probe, computed once per evaluation data set."""

    train: npt.NDArray[np.float32] | None
    test: npt.NDArray[np.float32]
    pair_docs: npt.NDArray[np.float32]
    probe: Probe
    probe_accuracy: float
    spearman: float


def _embed_all(
    runner: OrtRunner, data: EvalData, with_train: bool
) -> tuple[npt.NDArray[np.float32] | None, npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    tok, size = data.tokenizer_json, data.batch_size
    train = embed(runner, data.train_texts, tok, size, data.max_length) if with_train else None
    test = embed(runner, data.test_texts, tok, size, data.max_length)
    docs = embed(runner, data.pair_docs, tok, size, PAIR_MAX_LENGTH)
    return train, test, docs


def prepare_reference(fp32_model: onnx.ModelProto, data: EvalData) -> Reference:
    """Embed everything with the FP32 model and fit the FP32 probe on its train embeddings."""
    if not data.train_texts:
        raise CalibrationError("the probe needs train sentences; got none")
    train, test, docs = _embed_all(OrtRunner(fp32_model), data, with_train=True)
    assert train is not None
    probe = fit_probe(train, data.train_labels)
    accuracy = probe.accuracy(test, data.test_labels)
    rho = similarity_spearman(docs, data.pairs)
    logger.info("FP32 reference: probe accuracy %.4f, Spearman %.4f", accuracy, rho)
    return Reference(train=train, test=test, pair_docs=docs, probe=probe, probe_accuracy=accuracy, spearman=rho)


def share_feed(data: EvalData) -> dict[str, npt.NDArray[np.int64]]:
    """One real batch of length ``SHARE_SEQ_LENGTH`` (the longest Lee document, truncated)."""
    longest = max(data.pair_docs, key=len)
    _, feed = next(batches([longest], data.tokenizer_json, 1, SHARE_SEQ_LENGTH))
    return feed


def evaluate(
    fp32_model: onnx.ModelProto,
    model: onnx.ModelProto,
    report: GraphReport,
    data: EvalData,
    reference: Reference | None = None,
    name: str = "model",
    refit: bool = True,
) -> AccuracyReport:
    """Accuracy of ``model`` against ``fp32_model`` on ``data`` (see :class:`AccuracyReport`)."""
    ref = prepare_reference(fp32_model, data) if reference is None else reference
    runner = OrtRunner(model)
    train, test, docs = _embed_all(runner, data, with_train=refit)
    cosine = row_cosine(test, ref.test)
    refit_accuracy = None
    if train is not None:
        refit_accuracy = fit_probe(train, data.train_labels).accuracy(test, data.test_labels)
    table, warnings = layer_errors(
        fp32_model, model, report, data.layer_texts, data.tokenizer_json, data.batch_size, data.max_length
    )
    share = int8_gemm_share(gemm_costs(model, share_feed(data)))
    result = AccuracyReport(
        model_name=name,
        num_train=len(data.train_texts),
        num_test=len(data.test_texts),
        num_pairs=len(data.pairs),
        probe_accuracy=ref.probe.accuracy(test, data.test_labels),
        probe_accuracy_refit=refit_accuracy,
        reference_probe_accuracy=ref.probe_accuracy,
        cosine_mean=float(np.mean(cosine)),
        cosine_min=float(np.min(cosine)),
        spearman=similarity_spearman(docs, data.pairs),
        reference_spearman=ref.spearman,
        int8_gemm_share=share,
        layer_errors=table,
        warnings=warnings,
    )
    logger.info(
        "%s: probe %.4f (FP32 %.4f), cosine mean %.4f min %.4f",
        name,
        result.probe_accuracy,
        result.reference_probe_accuracy,
        result.cosine_mean,
        result.cosine_min,
    )
    return result


def reference_report(
    fp32_model: onnx.ModelProto, data: EvalData, reference: Reference, name: str = "fp32"
) -> AccuracyReport:
    """The FP32 model's own row (its probe and Spearman figures; cosine 1 by construction), without re-running."""
    refit = None
    if reference.train is not None:
        refit = fit_probe(reference.train, data.train_labels).accuracy(reference.test, data.test_labels)
    cosine = row_cosine(reference.test, reference.test)
    return AccuracyReport(
        model_name=name,
        num_train=len(data.train_texts),
        num_test=len(data.test_texts),
        num_pairs=len(data.pairs),
        probe_accuracy=reference.probe_accuracy,
        probe_accuracy_refit=refit,
        reference_probe_accuracy=reference.probe_accuracy,
        cosine_mean=float(np.mean(cosine)),
        cosine_min=float(np.min(cosine)),
        spearman=reference.spearman,
        reference_spearman=reference.spearman,
        int8_gemm_share=int8_gemm_share(gemm_costs(fp32_model, share_feed(data))),
    )
