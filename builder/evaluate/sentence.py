"""Evaluation stage: sentence-encoder figures (embedding cosine, the VADER probe, Lee Spearman).

Embeddings come from the survey's :class:`~builder.evaluate.runner.Pooling` (a pooled output, or the masked
mean of a hidden state). The FP32 side stores the embeddings of the probe's train and test sentences and of
the Lee documents (float32); the FP32 probe is refitted from the stored train embeddings (deterministic:
lbfgs, fixed C and seed), so a cached reference gives the same figures as a fresh one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from builder.evaluate.metrics import Probe, fit_probe, row_cosine, similarity_spearman
from builder.evaluate.progress import Phases
from builder.evaluate.report import SentenceFigures
from builder.evaluate.runner import OrtRunner, Pooling, embed_texts
from calib.errors import CalibrationError
from calib.text_encoder import TextEncoder

if TYPE_CHECKING:
    from builder.evaluate.evaluate import EvalData

PAIR_MAX_LENGTH = 256  # the Lee documents are paragraphs; 256 is MiniLM's trained sequence length


@dataclass(frozen=True, kw_only=True)
class SentenceReference:
    """FP32 embeddings and the FP32 probe."""

    pooling: Pooling
    train: npt.NDArray[np.float32] | None
    test: npt.NDArray[np.float32]
    pair_docs: npt.NDArray[np.float32]
    probe: Probe
    probe_accuracy: float
    spearman: float | None


def _spearman(docs: npt.NDArray[np.float32], pairs: Sequence[tuple[int, int, float]]) -> float | None:
    rho = similarity_spearman(docs, pairs)
    return None if math.isnan(rho) else rho


def _embed(runner: OrtRunner, encoder: TextEncoder, texts: Sequence[str], pooling: Pooling, batch_size: int,
           max_length: int, progress: Phases, desc: str) -> npt.NDArray[np.float32]:
    total = -(-len(texts) // batch_size)
    with progress.phase(f"{desc} ({len(texts)} texts)", total=total) as step:
        return embed_texts(runner, encoder, texts, pooling, batch_size, max_length, step)


def embed_all(runner: OrtRunner, encoder: TextEncoder, pooling: Pooling, data: EvalData, with_train: bool,
              progress: Phases, who: str) -> dict[str, npt.NDArray[np.float32]]:
    """Embeddings of the probe train (optional) and test sentences and of the Lee documents."""
    size, length = data.batch_size, data.max_length
    out = {}
    if with_train:
        out["train"] = _embed(runner, encoder, data.train_texts, pooling, size, length, progress,
                              f"{who}: probe train sentences")
    out["test"] = _embed(runner, encoder, data.test_texts, pooling, size, length, progress, f"{who}: test sentences")
    out["docs"] = _embed(runner, encoder, data.pair_docs, pooling, size, PAIR_MAX_LENGTH, progress,
                         f"{who}: Lee documents")
    return out


def sentence_reference(arrays: Mapping[str, npt.NDArray[Any]], pooling: Pooling,
                       data: EvalData) -> SentenceReference:
    """The FP32 probe fitted on the stored train embeddings, and the FP32 figures."""
    if not data.train_texts:
        raise CalibrationError("the probe needs train sentences; got none")
    train = np.asarray(arrays["sent/train"], dtype=np.float32)
    test = np.asarray(arrays["sent/test"], dtype=np.float32)
    docs = np.asarray(arrays["sent/docs"], dtype=np.float32)
    probe = fit_probe(train, data.train_labels)
    return SentenceReference(pooling=pooling, train=train, test=test, pair_docs=docs, probe=probe,
                             probe_accuracy=probe.accuracy(test, data.test_labels),
                             spearman=_spearman(docs, data.pairs))


def sentence_figures(runner: OrtRunner, encoder: TextEncoder, ref: SentenceReference, data: EvalData,
                     refit: bool, progress: Phases, who: str) -> SentenceFigures:
    """The evaluated model's sentence figures against ``ref``."""
    emb = embed_all(runner, encoder, ref.pooling, data, refit, progress, who)
    cosine = row_cosine(emb["test"], ref.test)
    refit_accuracy = None
    if "train" in emb:
        refit_accuracy = fit_probe(emb["train"], data.train_labels).accuracy(emb["test"], data.test_labels)
    return SentenceFigures(
        embedding=ref.pooling.description,
        num_train=len(data.train_texts),
        num_test=len(data.test_texts),
        num_pairs=len(data.pairs),
        probe_accuracy=ref.probe.accuracy(emb["test"], data.test_labels),
        probe_accuracy_refit=refit_accuracy,
        reference_probe_accuracy=ref.probe_accuracy,
        cosine_mean=float(np.mean(cosine)),
        cosine_min=float(np.min(cosine)),
        spearman=_spearman(emb["docs"], data.pairs),
        reference_spearman=ref.spearman,
    )


def reference_figures(ref: SentenceReference, data: EvalData) -> SentenceFigures:
    """The FP32 model's own figures (cosine 1 by construction), without re-running it."""
    refit = None
    if ref.train is not None:
        refit = fit_probe(ref.train, data.train_labels).accuracy(ref.test, data.test_labels)
    cosine = row_cosine(ref.test, ref.test)
    return SentenceFigures(
        embedding=ref.pooling.description, num_train=len(data.train_texts), num_test=len(data.test_texts),
        num_pairs=len(data.pairs), probe_accuracy=ref.probe_accuracy, probe_accuracy_refit=refit,
        reference_probe_accuracy=ref.probe_accuracy, cosine_mean=float(np.mean(cosine)),
        cosine_min=float(np.min(cosine)), spearman=ref.spearman, reference_spearman=ref.spearman,
    )
